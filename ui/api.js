// Talking to the service: the API key header, failure bodies, and server-sent events over fetch().

const KEY_STORAGE = "llava-api-key";

/** The API key the user gave in this tab (sessionStorage: gone when the tab closes). */
export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

/** Headers for an API call: the key when there is one. */
export function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

/** An HTTP failure with the service's message ({"status": "failed", "error": "..."}). */
export class ServiceError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** The failure body's message, or what can be said about a body that is not one. */
export async function failure(response) {
  const text = await response.text();
  let message = `${response.status} ${response.statusText}`.trim();
  try {
    const body = JSON.parse(text);
    if (body && typeof body.error === "string") message = body.error;
    else if (body && body.error && body.error.message) message = body.error.message;
  } catch {
    if (text.trim()) message += `: ${text.trim().slice(0, 200)}`;
  }
  return new ServiceError(response.status, message);
}

/** fetch() that throws ServiceError unless the answer is 2xx. */
export async function call(url, options = {}) {
  const response = await fetch(url, { ...options, headers: authHeaders(options.headers) });
  if (!response.ok) throw await failure(response);
  return response;
}

/** Calls onEvent(name, data) for each server-sent event of a streamed answer (EventSource
 * cannot POST, so the body is read here: events are separated by a blank line). */
export async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}

/** Seconds as MM:SS (MM:SS.s with decimals). */
export function clock(seconds, decimals = 0) {
  const rounded = Number(seconds.toFixed(decimals)); // so 59.96 s shows as 01:00.0, not 00:60.0
  const minutes = Math.floor(rounded / 60);
  const rest = rounded - minutes * 60;
  const width = decimals ? 3 + decimals : 2;
  return `${String(minutes).padStart(2, "0")}:${rest.toFixed(decimals).padStart(width, "0")}`;
}
