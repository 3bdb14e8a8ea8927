// Long videos as jobs (/jobs/submit, status, get, cancel, ask; the task id in the query or body):
// submit, poll the status every 2 s with a progress bar, show the segment captions on a timeline,
// then the answer, and take follow-up questions.
// Kept apart from app.js: the job API's contract may still change.

import { call, clock } from "./api.js";

const POLL_MS = 2000;
// The statuses the job API answers, as jobs/records.py's JobStatus names them (a test checks both agree).
const JobStatus = Object.freeze({
  PENDING: "pending",
  IN_PROGRESS: "in_progress",
  COMPLETED: "completed",
  FAILED: "failed",
  CANCELED: "canceled",
});
const FINISHED = new Set([JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED]);
const $ = (id) => document.getElementById(id);
let taskId = null; // the job that follow-up questions go to
let captioned = { done: 0, total: 0 }; // the last progress shown, for the line after Stop

function numberOf(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

function jobMetadata() {
  return {
    question: $("question").value.trim() || undefined,
    caption_prompt: $("caption_prompt").value.trim() || undefined,
    segment_seconds: numberOf("segment_seconds"),
    overlap_seconds: numberOf("overlap_seconds"),
    frames_per_segment: numberOf("frames_per_segment"),
    start_time: numberOf("job_start_time"),
    end_time: numberOf("job_end_time"),
    max_new_tokens: numberOf("job_max_new_tokens"),
  };
}

const sleep = (ms, signal) =>
  new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(signal.reason);
    });
  });

function showProgress(job) {
  const progress = job.progress || {};
  const total = progress.segments_total || 0;
  const done = progress.segments_captioned || 0;
  const bar = $("job-progress");
  bar.max = Math.max(total, 1);
  bar.value = done;
  captioned = { done, total };
  const remaining = progress.remaining_seconds;
  const known = remaining !== null && remaining !== undefined && !FINISHED.has(job.status);
  const left = known ? `, about ${Math.ceil(remaining)} s left` : "";
  // The label says "Progress"; the job's state is in the status line.
  $("job-progress-text").textContent = `${done} of ${total || "?"} segments captioned${left}`;
}

/** After Stop: what was captioned, and no time left to wait. */
function showStopped() {
  const { done, total } = captioned;
  $("job-progress-text").textContent = `${done} of ${total || "?"} segments captioned, then stopped`;
}

/** A new job starts from an empty bar, not from the previous job's. */
function resetJobView() {
  const bar = $("job-progress");
  bar.max = 1;
  bar.value = 0;
  captioned = { done: 0, total: 0 };
  $("job-progress-text").textContent = "";
  $("segments").replaceChildren();
}

function showSegments(segments) {
  const items = (segments || []).map((segment) => {
    const item = document.createElement("li");
    const when = document.createElement("time");
    when.textContent = `${clock(segment.start)}–${clock(segment.end)}`;
    const text = document.createElement("span");
    text.textContent = segment.error ? `(failed: ${segment.error})` : segment.caption || "…";
    item.append(when, text);
    return item;
  });
  $("segments").replaceChildren(...items);
}

/** Run one job to its end; ``page`` gives app.js's send, setStatus and showError. */
export async function startJob(signal, page) {
  resetJobView();
  $("job").hidden = false;
  $("followup").hidden = true;
  $("followup-answers").replaceChildren();
  // The chosen video by its media store id (uploaded once), as file_id; or the pasted URL.
  const submitted = await page.send("/jobs/submit", "video", jobMetadata(), signal, "Submitting the job", true);
  taskId = (await submitted.response.json()).task_id;
  const query = `task_id=${encodeURIComponent(taskId)}`;
  signal.addEventListener("abort", () => {
    showStopped();
    call(`/jobs/cancel?${query}`, { method: "POST" }).catch(() => {});
  });
  let job;
  do {
    job = await (await call(`/jobs/status?${query}`, { signal })).json();
    if (signal.aborted) throw signal.reason; // stopped while this status was on its way
    showProgress(job);
    showSegments(job.segments);
    page.setStatus(`Job ${job.status.replace("_", " ")}…`);
    if (!FINISHED.has(job.status)) await sleep(POLL_MS, signal);
  } while (!FINISHED.has(job.status));
  if (job.status !== JobStatus.COMPLETED) throw new Error(job.error || `the job was ${job.status}`);
  const result = await (await call(`/jobs/get?${query}`, { signal })).json();
  showSegments(result.segments);
  $("answer").textContent = result.answer;
  $("followup").hidden = false;
  page.setStatus("Done.");
}

$("followup").addEventListener("submit", async (event) => {
  event.preventDefault();
  const question = $("followup-question").value.trim();
  if (!taskId || !question) return;
  const entry = document.createElement("p");
  entry.textContent = `${question} — …`;
  $("followup-answers").append(entry);
  try {
    const response = await call("/jobs/ask", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ task_id: taskId, question }),
    });
    entry.textContent = `${question} — ${(await response.json()).response}`;
  } catch (error) {
    entry.textContent = `${question} — failed: ${error.message}`;
  }
});
