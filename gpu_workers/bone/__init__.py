"""A CT or dental CBCT series becomes a light 3D bone model (the founding paper's second proof of concept)."""
