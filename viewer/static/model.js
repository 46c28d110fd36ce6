// The 3D page: the model's X3D scene in X3DOM (rotate, zoom, reset); phones get the light level.
const scene = document.getElementById("scene");
const small = Math.min(window.innerWidth, window.innerHeight) < 700;
const file = small && scene.dataset.phone === "yes" ? "model-phone.x3d" : "model.x3d";
const model = document.getElementById("model");
model.onload = () => { scene.dataset.loaded = "yes"; };      // X3DOM calls it once the scene is in
model.onerror = () => { scene.dataset.loaded = "failed"; };
model.setAttribute("url", `/api/jobs/${scene.dataset.job}/files/${file}`);
scene.dataset.level = file;
const triangles = document.getElementById("triangles");
if (triangles && file === "model-phone.x3d") triangles.textContent = `${triangles.dataset.phone} triangles (phone level)`;
document.getElementById("reset").addEventListener("click", () => {
  const runtime = document.getElementById("x3d").runtime;
  if (runtime) runtime.resetView();
});
