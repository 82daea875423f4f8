// Upload page: preview the chosen image, send it to POST /v1/captions, show the result.
const fileInput = document.getElementById("file");
const drop = document.getElementById("drop");
const $ = (id) => document.getElementById(id);

async function captionFile(file) {
  $("error").hidden = true;
  $("result").hidden = false;
  $("preview").src = URL.createObjectURL(file);
  $("preview").alt = file.name;
  $("caption").textContent = "Captioning\u2026";
  $("caption").dataset.state = "pending";
  $("alternatives").replaceChildren();
  $("objects").replaceChildren();
  $("meta").textContent = "";
  $("confidence").textContent = "";
  const form = new FormData();
  form.append("image", file, file.name);
  const query = new URLSearchParams({
    beam_size: $("beam_size").value, n_best: $("n_best").value, grounding: $("grounding").checked,
  });
  try {
    const response = await fetch(`/v1/captions?${query}`, { method: "POST", body: form });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
    const result = body.results[0];
    $("caption").textContent = result.caption;
    $("caption").dataset.state = "done";
    // confidence: the chance that the caption names nothing that is not in the photo.
    if (result.confidence !== null && result.confidence !== undefined) {
      const pct = Math.round(result.confidence * 100);
      $("confidence").textContent = `Confidence ${pct}%: how likely it is that the caption names nothing that ` +
        "is not in the photo";
      $("confidence").dataset.level = result.confidence >= 0.7 ? "high" : result.confidence >= 0.4 ? "medium" : "low";
    }
    for (const obj of result.objects) {
      const tag = document.createElement("li");
      tag.textContent = `${obj.word} ${Math.round(obj.p * 100)}%`;
      tag.title = `${obj.label} (ImageNet class), p = ${obj.p.toFixed(2)}`;
      $("objects").append(tag);
    }
    for (const alt of result.alternatives) {
      const li = document.createElement("li");
      li.textContent = `${alt.caption} (${alt.score.toFixed(2)})`;
      $("alternatives").append(li);
    }
    $("meta").textContent = `score ${result.score.toFixed(2)} \u00b7 ${body.elapsed_ms} ms \u00b7 ${body.model}`;
  } catch (err) {
    $("result").hidden = true;
    $("caption").dataset.state = "error";
    $("error").textContent = err.message;
    $("error").hidden = false;
  }
}

fileInput.addEventListener("change", () => { if (fileInput.files[0]) captionFile(fileInput.files[0]); });
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) captionFile(e.dataTransfer.files[0]);
});
