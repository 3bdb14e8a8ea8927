// The page: pick media, ask, stream the answer from /analyze_video or /analyze_image, show the
// frames the model saw and the numbers of the answer. Long videos go to jobs.js.

import { apiKey, call, clock, readEvents, ServiceError, setApiKey } from "./api.js";
import { startJob } from "./jobs.js";

const $ = (id) => document.getElementById(id);
const IMAGE_SUFFIX = /\.(jpe?g|png|webp|gif|bmp|tiff?)(\?|#|$)/i;
// A rate needs this many tokens after the first (which comes with the prompt's prefill) and this
// long: a few tokens arriving together would read as thousands per second.
const RATE_MIN_TOKENS = 8;
const RATE_MIN_SECONDS = 0.2;
// The statuses that refuse the uploaded file itself (not a video or image, damaged).
const FILE_REFUSALS = new Set([415, 422]);

const form = $("ask");
const ui = {
  file: $("file"),
  url: $("url"),
  kind: $("kind"),
  question: $("question"),
  submit: $("submit"),
  stop: $("stop"),
  status: $("status"),
  error: $("error"),
  framesBox: $("frames-box"),
  frames: $("frames"),
  answer: $("answer"),
  facts: $("facts"),
  key: $("api-key"),
  keyBox: $("key-box"),
};
let running = null; // the AbortController of the request in flight

function mode() {
  return form.elements.mode.value;
}

const isImage = (file) => file.type.startsWith("image/");

/** "video" or "image": the user's choice, else the files' types (a video among them: the video
 * endpoint, the images beside it) or the URL's suffix. */
function mediaKind() {
  if (ui.kind.value !== "auto") return ui.kind.value;
  const files = [...ui.file.files];
  if (files.length) return files.every(isImage) ? "image" : "video";
  return IMAGE_SUFFIX.test(ui.url.value) ? "image" : "video";
}

/** A number field's value, or undefined when empty (the service's default applies). */
function numberOf(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

/** Only the fields the user filled in; JSON.stringify drops the undefined ones. */
function answerMetadata(kind) {
  const metadata = {
    prompt: ui.question.value.trim() || undefined,
    max_new_tokens: numberOf("max_new_tokens"),
    stream: true,
    return_frames: true,
  };
  if (kind === "video") {
    for (const name of ["num_frames", "fps", "start_time", "end_time"]) metadata[name] = numberOf(name);
  }
  return metadata;
}

/** The chosen files a request sends, in order: on the video endpoint the first non-image file is
 * the video and every image goes beside it (in the order chosen); ``job`` sends the video alone. */
function filesFor(kind, job = false) {
  const files = [...ui.file.files];
  if (kind !== "video") return files;
  const video = files.find((file) => !isImage(file)) || files[0];
  return job ? [video] : [video, ...files.filter((file) => file !== video)];
}

// Chosen File → its id in the media store (POST /media), so that follow-up questions send the id
// instead of the file again. Keyed by the File itself, so other files never match; fileChosen()
// forgets the ids when the selection changes.
const storedIds = new Map();

/** The media store's ids of ``files``: each one not stored yet is uploaded, one request each, in
 * the order chosen. */
async function idsOf(files, signal) {
  for (const file of ui.file.files) {
    if (!files.includes(file) || storedIds.has(file)) continue;
    setStatus(`Uploading ${file.name}…`);
    const body = new FormData();
    body.append("file", file, file.name);
    try {
      storedIds.set(file, (await (await call("/media", { method: "POST", body, signal })).json()).id);
    } catch (error) {
      throw aboutTheFile(error, [file]);
    }
  }
  return files.map((file) => storedIds.get(file));
}

/** POST a question (or a job) to ``url`` as JSON: about the chosen files by their ids in the media
 * store (``media_id``: the video first, then the images; a ``job`` takes the video's ``file_id``),
 * or about the pasted URL. ``doing`` is the status line meanwhile. Returns the response and, for
 * files, what the facts say of the upload. */
async function send(url, kind, metadata, signal, doing, job = false) {
  const post = (fields) =>
    call(url, {
      method: "POST",
      signal,
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ...fields, metadata }),
    });
  if (!ui.file.files.length) {
    setStatus(`${doing}…`);
    return { response: await post({ [`${kind}_url`]: ui.url.value.trim() }) };
  }
  const files = filesFor(kind, job);
  const byIds = async () => {
    const reused = files.every((file) => storedIds.has(file));
    const ids = await idsOf(files, signal);
    const upload = reused ? `reusing the upload (${ids.join(", ")})` : `uploaded as ${ids.join(", ")}`;
    setStatus(reused ? `${doing}, ${upload}…` : `${doing}…`);
    try {
      return { response: await post(job ? { file_id: ids[0] } : { media_id: ids }), upload };
    } catch (error) {
      throw aboutTheFile(error, files);
    }
  };
  try {
    return await byIds();
  } catch (error) {
    if (!(error instanceof ServiceError && error.status === 404)) throw error;
    // The store no longer holds a file (expired or evicted): upload them again, once.
    for (const file of files) storedIds.delete(file);
    setStatus("The service no longer holds the upload: uploading again…");
    return await byIds();
  }
}

function setStatus(text) {
  ui.status.textContent = text;
}

/** Show a failure; a missing or wrong API key opens the key field. */
function showError(error) {
  if (error.name === "AbortError") {
    setStatus("Stopped."); // closing the connection stops the generation on the service
    return;
  }
  ui.error.hidden = false;
  ui.error.textContent = error.message;
  setStatus("Failed.");
  if (error instanceof ServiceError && error.status === 401) {
    // The page's own words: the API's message tells a program which header to send.
    ui.keyBox.open = true;
    ui.error.textContent = apiKey()
      ? "The service did not accept this API key: correct it below and ask again."
      : "This service needs an API key: enter it below and ask again.";
    ui.key.focus();
  }
}

/** A refusal of a file names it (``files``, the ones the refused request sent): the service's
 * message names an id at most. */
function aboutTheFile(error, files) {
  const names = files.map((file) => file.name).join(", ");
  if (names && error instanceof ServiceError && FILE_REFUSALS.has(error.status)) {
    return new ServiceError(error.status, `${names}: ${error.message}`);
  }
  return error;
}

function clearResult() {
  ui.error.hidden = true;
  ui.error.textContent = "";
  ui.frames.replaceChildren();
  ui.framesBox.hidden = true;
  ui.answer.textContent = "";
  ui.facts.replaceChildren();
  ui.facts.hidden = true;
  $("job").hidden = true;
}

function showFrames(frames) {
  const images = frames.filter((frame) => frame.time === null).length;
  let imageNumber = 0;
  const items = frames.map((frame, index) => {
    const item = document.createElement("li");
    const figure = document.createElement("figure");
    const image = document.createElement("img");
    const caption = document.createElement("figcaption");
    if (frame.time === null) imageNumber += 1;
    const imageName = images > 1 ? `image ${imageNumber}` : "the image";
    const when = frame.time === null ? imageName : clock(frame.time, 1);
    image.src = frame.image;
    image.alt = frame.time === null ? "The image as the model received it" : `Frame ${index + 1} at ${when}`;
    caption.textContent = when;
    if (frame.time !== null) caption.dataset.time = frame.time;
    figure.append(image, caption);
    item.append(figure);
    return item;
  });
  ui.frames.replaceChildren(...items);
  ui.framesBox.hidden = false;
}

/** The answer's numbers: video_info, usage, the times measured here, and how the file was sent. */
function showFacts(body, times, upload) {
  const facts = [];
  if (body.video_info) {
    facts.push(["Video duration", `${body.video_info.video_duration.toFixed(2)} s`]);
    facts.push(["Frames", String(body.video_info.frame_count)]);
  }
  if (body.usage) {
    facts.push(["Prompt tokens", `${body.usage.prompt_tokens} (${body.usage.visual_tokens} visual)`]);
    facts.push(["Answer tokens", String(body.usage.completion_tokens)]);
  }
  if (times.firstToken !== undefined) facts.push(["First token after", `${times.firstToken.toFixed(2)} s`]);
  facts.push(["Answered in", `${times.total.toFixed(2)} s`]);
  const generating = times.total - (times.firstToken ?? times.total);
  const after = body.usage ? body.usage.completion_tokens - 1 : 0;
  if (after >= RATE_MIN_TOKENS && generating >= RATE_MIN_SECONDS) {
    facts.push(["Speed", `${(after / generating).toFixed(1)} tokens/s`]);
  }
  if (upload) facts.push(["Upload", upload]);
  ui.facts.replaceChildren(
    ...facts.flatMap(([name, value]) => {
      const term = document.createElement("dt");
      const detail = document.createElement("dd");
      term.textContent = name;
      detail.textContent = value;
      return [term, detail];
    }),
  );
  ui.facts.hidden = false;
}

/** One question about a video or an image, answered as a stream of events. */
async function ask(signal) {
  const kind = mediaKind();
  const began = performance.now();
  const seconds = () => (performance.now() - began) / 1000;
  const times = {};
  const doing = `Asking about the ${kind}`;
  const { response, upload } = await send(`/analyze_${kind}`, kind, answerMetadata(kind), signal, doing);
  setStatus("The model is reading it…");
  let answered = false;
  await readEvents(response, (event, data) => {
    if (event === "frames") {
      showFrames(data.frames);
    } else if (event === "delta") {
      if (times.firstToken === undefined) {
        times.firstToken = seconds();
        setStatus("Answering…");
      }
      ui.answer.textContent += data.text;
    } else if (event === "answer") {
      answered = true;
      ui.answer.textContent = data.response;
      times.total = seconds();
      showFacts(data, times, upload);
      setStatus("Done.");
    } else if (event === "error") {
      throw new ServiceError(200, data.error);
    }
  });
  if (!answered) throw new Error("the answer ended early; try again");
}

function checkSource() {
  if (!ui.file.files[0] && !ui.url.value.trim()) throw new Error("Choose or drop a file, or paste a URL.");
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  if (running) return;
  clearResult();
  $("result").scrollIntoView({ block: "nearest" }); // below the form on a phone
  running = new AbortController();
  ui.submit.disabled = true;
  ui.stop.disabled = false;
  try {
    checkSource();
    if (mode() === "job") {
      await startJob(running.signal, { send, setStatus, showError });
    } else {
      await ask(running.signal);
    }
  } catch (error) {
    showError(error);
  } finally {
    running = null;
    ui.submit.disabled = false;
    ui.stop.disabled = true;
  }
});

ui.stop.addEventListener("click", () => running?.abort());

// The source: a dropped or chosen file, or a URL (choosing one clears the other).
function fileChosen() {
  storedIds.clear(); // other files, or none: the ids were the previous selection's
  const files = [...ui.file.files];
  const size = (file) => (file.size < 1e6 ? `${Math.ceil(file.size / 1e3)} kB` : `${(file.size / 1e6).toFixed(1)} MB`);
  $("file-name").textContent = files.map((file) => `${file.name} (${size(file)})`).join(", ");
  if (files.length) ui.url.value = "";
}
ui.file.addEventListener("change", fileChosen);
ui.url.addEventListener("input", () => {
  if (ui.url.value) {
    ui.file.value = "";
    fileChosen();
  }
});
const drop = $("drop");
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer.files.length) {
    ui.file.files = event.dataTransfer.files;
    fileChosen();
  }
});

// Job mode has its own settings.
for (const radio of form.elements.mode) {
  radio.addEventListener("change", () => {
    const job = mode() === "job";
    $("answer-options").hidden = job;
    $("job-options").hidden = !job;
    ui.submit.textContent = job ? "Start job" : "Ask";
  });
}

ui.key.value = apiKey();
ui.key.addEventListener("input", () => setApiKey(ui.key.value.trim()));
