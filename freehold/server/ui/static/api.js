// The page's side of the HTTP API: the API key (typed in by the user, kept in this browser, sent only as an
// Authorization header, never in a URL), JSON calls, and the server-sent events of a streamed chat completion.
const KEY = 'freehold.apiKey';

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
  }
}

let key = sessionStorage.getItem(KEY) ?? localStorage.getItem(KEY) ?? '';

export function apiKey() {
  return key;
}

/** Send `value` from now on, without storing it (until `saveApiKey`: a key is stored once the server accepts it). */
export function useApiKey(value) {
  key = value;
}

/** Keep the key in use for this tab (sessionStorage); with `remember`, also across visits (localStorage). */
export function saveApiKey(remember) {
  sessionStorage.setItem(KEY, key);
  if (remember) localStorage.setItem(KEY, key);
  else localStorage.removeItem(KEY);
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

export async function postJson(path, body) {
  const response = await fetch(path, {
    method: 'POST', body: JSON.stringify(body), headers: headers({ 'Content-Type': 'application/json' }),
  });
  if (!response.ok) throw await apiError(response);
  return response.json();
}

export async function getJson(path) {
  const response = await fetch(path, { headers: headers(), cache: 'no-store' });
  if (!response.ok) throw await apiError(response);
  return response.json();
}

async function apiError(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body?.error?.message) message = body.error.message;
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, message);
}

/** POST /v1/chat/completions with stream: yields each chunk (parsed JSON) until [DONE]; aborting `signal` ends the
 * request (the server then aborts the generation and frees its KV cache). */
export async function* streamChat(body, signal) {
  const response = await fetch('/v1/chat/completions', {
    method: 'POST', body: JSON.stringify(body), signal, headers: headers({ 'Content-Type': 'application/json' }),
  });
  if (!response.ok) throw await apiError(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const data = eventData(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (data === '[DONE]') return;
        if (!data) continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(0, chunk.error.message);
        yield chunk;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function eventData(event) {
  return event.split('\n').filter((line) => line.startsWith('data:'))
    .map((line) => line.slice(5).trimStart()).join('\n');
}
