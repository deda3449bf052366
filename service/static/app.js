// The page's one job: send the chosen photo to POST /denoise and show what came back.
"use strict";

const $ = (id) => document.getElementById(id);
let beforeUrl = null;
let afterUrl = null;

function show(element, text) {
  element.textContent = text;
  element.hidden = !text;
}

// Why the sub-network ran, from the DDSNet-Reason header: the gate's pick, a slimmer one under load, or asked.
function describeReason(reason, gateSubnet, quality) {
  if (reason === "load") return `slimmer than the gate's pick (${gateSubnet}) to keep latency under load`;
  if (reason === "gate") return "picked by the gate";
  return `requested (${quality})`;
}

// Which weights ran and why, from DDSNet-Profile and DDSNet-Profile-Reason.
function describeProfile(profile, reason) {
  const why = { gate: "chosen by the gate", jpeg_header: "the upload is a JPEG file", requested: "requested" };
  return `${profile} (${why[reason] || reason})`;
}

function setFile(file) {
  const transfer = new DataTransfer();
  transfer.items.add(file);
  $("file").files = transfer.files;
}

const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer.files.length) setFile(event.dataTransfer.files[0]);
});
drop.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("file").click(); }
});

$("slider").addEventListener("input", (event) => {
  $("after-clip").style.clipPath = `inset(0 0 0 ${event.target.value}%)`;
});

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = $("file").files[0];
  if (!file) { show($("error"), "Choose a photo first."); return; }
  const form = new FormData($("form"));
  const quality = form.get("quality");
  const noise = form.get("noise");
  const body = new FormData();
  body.append("file", file);
  const headers = {};
  const key = $("key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;

  show($("error"), "");
  show($("status"), "Denoising…");
  $("send").disabled = true;
  const started = performance.now();
  try {
    const query = new URLSearchParams({ quality, noise });
    const response = await fetch(`/denoise?${query}`, { method: "POST", body, headers });
    if (!response.ok) {
      let detail = `HTTP ${response.status}`;
      try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
      throw new Error(detail);
    }
    const result = await response.blob();
    const seconds = (performance.now() - started) / 1000;
    if (beforeUrl) URL.revokeObjectURL(beforeUrl);
    if (afterUrl) URL.revokeObjectURL(afterUrl);
    beforeUrl = URL.createObjectURL(file);
    afterUrl = URL.createObjectURL(result);
    $("before").src = beforeUrl;
    $("after").src = afterUrl;
    await $("after").decode();
    const subnet = response.headers.get("DDSNet-Subnet");
    const spent = Number(response.headers.get("DDSNet-GFLOPs"));
    const widest = Number(response.headers.get("DDSNet-GFLOPs-Widest"));
    $("subnet").textContent = subnet;
    $("reason").textContent = describeReason(response.headers.get("DDSNet-Reason"),
                                             response.headers.get("DDSNet-Gate-Subnet"), quality);
    $("profile").textContent = describeProfile(response.headers.get("DDSNet-Profile"),
                                               response.headers.get("DDSNet-Profile-Reason"));
    $("gflops").textContent = `${spent.toFixed(1)} GFLOPs, against ${widest.toFixed(1)} for best`
      + ` (${Math.round(100 * spent / widest)}%)`;
    $("time").textContent = `${seconds.toFixed(2)} s, of which compute `
      + `${(Number(response.headers.get("DDSNet-Compute-Ms")) / 1000).toFixed(2)} s`;
    $("size").textContent = `${$("after").naturalWidth} × ${$("after").naturalHeight}`;
    $("download").href = afterUrl;
    $("download").download = file.name.replace(/\.[^.]*$/, "") + ".denoised.png";
    $("result").hidden = false;
    show($("status"), "Done.");
  } catch (error) {
    show($("status"), "");
    show($("error"), error.message);
  } finally {
    $("send").disabled = false;
  }
});
