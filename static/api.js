/**
 * The one module that talks to the chat service (the contract is API.md).
 *
 * Every call either returns the parsed body or throws one of two errors, so
 * the page has a single way to tell "the service said no" (ApiError, with the
 * HTTP status and FastAPI's `detail`) from "the service could not be reached"
 * (NetworkError, worth a retry).
 */

/**
 * The service answered with an error status. `detail` is FastAPI's detail
 * (a string, or a list of problems for a 422); `body` is the whole JSON body,
 * which for a 409 also names the reply in progress (`message_id`).
 */
export class ApiError extends Error {
  constructor(status, body) {
    const detail = body?.detail;
    super(typeof detail === "string" ? detail : `HTTP ${status}`);
    this.name = "ApiError";
    this.status = status;
    this.detail = detail;
    this.body = body;
  }
}

/** The request never got an answer: offline, server down, connection cut. */
export class NetworkError extends Error {
  constructor(cause) {
    super("The service could not be reached.", { cause });
    this.name = "NetworkError";
  }
}

/** Path of a chat, or of something under it, with every ID encoded. */
function chatPath(chatId, ...rest) {
  return ["/chats", chatId, ...rest]
    .map((part, i) => (i ? encodeURIComponent(part) : part))
    .join("/");
}

/** Adds `?name=value` pairs, skipping the ones that are null or undefined. */
function withQuery(path, params) {
  const query = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== null && value !== undefined) query.set(name, String(value));
  }
  const text = query.toString();
  return text ? `${path}?${text}` : path;
}

/** One JSON request; returns the Response, throws ApiError or NetworkError. */
async function request(method, path, { body, headers = {} } = {}) {
  const init = { method, headers: { Accept: "application/json", ...headers } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    // fetch() rejects only when no HTTP answer came back at all.
    throw new NetworkError(error);
  }
  if (!response.ok) {
    let body = { detail: response.statusText };
    try {
      body = await response.json();
    } catch {
      // Not JSON (a proxy's error page, say): keep the status text.
    }
    throw new ApiError(response.status, body);
  }
  return response;
}

/** The body of a JSON response (a 204 has none). */
async function json(responsePromise) {
  const response = await responsePromise;
  return response.status === 204 ? null : response.json();
}

/** One page of chats, newest first: `{data, has_more}`. */
export function listChats({ after = null, limit = 20 } = {}) {
  return json(request("GET", withQuery("/chats", { after, limit })));
}

/** Creates a chat (all fields optional) and returns it. */
export function createChat(fields = {}) {
  return json(request("POST", "/chats", { body: fields }));
}

export function getChat(chatId) {
  return json(request("GET", chatPath(chatId)));
}

/** Changes `title` and/or `system_prompt`; returns the Chat. */
export function updateChat(chatId, fields) {
  return json(request("PATCH", chatPath(chatId), { body: fields }));
}

/** Deletes a chat and its messages (the server stops its reply in progress). */
export async function deleteChat(chatId) {
  await request("DELETE", chatPath(chatId));
}

/** The whole history, oldest first, following `has_more` page by page. */
export async function listMessages(chatId) {
  const messages = [];
  let after = null;
  for (;;) {
    const page = await json(request("GET", withQuery(chatPath(chatId, "messages"), { after })));
    messages.push(...page.data);
    if (!page.has_more || page.data.length === 0) return messages;
    after = page.data[page.data.length - 1].id;
  }
}

export function getMessage(chatId, messageId) {
  return json(request("GET", chatPath(chatId, "messages", messageId)));
}

/**
 * Sends a user message and starts the reply, without waiting for it.
 *
 * `Accept: application/json` asks for 202 with both messages instead of the
 * event stream, and the Location header names the reply's stream for an
 * EventSource. The Idempotency-Key makes a retry after a network error safe:
 * the server answers it with the same two messages instead of sending twice.
 */
export async function sendMessage(chatId, content, idempotencyKey) {
  const response = await request("POST", chatPath(chatId, "messages"), {
    body: { content },
    headers: { "Idempotency-Key": idempotencyKey },
  });
  const { user_message: userMessage, assistant_message: assistantMessage } = await response.json();
  const streamUrl = response.headers.get("Location") ?? replyStreamUrl(chatId, assistantMessage.id);
  return { userMessage, assistantMessage, streamUrl };
}

/** Stops a reply in progress; returns the Message (cancel is idempotent). */
export function cancelReply(chatId, messageId) {
  return json(request("POST", chatPath(chatId, "messages", messageId, "cancel")));
}

/** URL of a reply's event stream; `after` skips the events already seen. */
export function replyStreamUrl(chatId, messageId, after = 0) {
  return withQuery(chatPath(chatId, "messages", messageId, "stream"), { after: after || null });
}

/** Every event name a reply's stream sends (API.md, "The reply's event stream"). */
const REPLY_EVENTS = [
  "message.created",
  "message.delta",
  "tool.call",
  "tool.result",
  "chat.updated",
  "message.done",
];

/**
 * Follows a reply's event stream with an EventSource.
 *
 * `handlers` has one function per event name (each gets the parsed data),
 * plus `onConnectionChange(state)` with "open", "reconnecting" or "lost".
 * Every event has a numeric id: the ones at or below `after` (or already
 * seen, should a reconnect replay them) are skipped, so text never doubles.
 * Returns `{ close(), lastEventId() }`.
 */
export function followReply(url, handlers, { after = 0 } = {}) {
  const source = new EventSource(url);
  let lastEventId = after;
  let finished = false;

  for (const name of REPLY_EVENTS) {
    source.addEventListener(name, (event) => {
      const id = Number(event.lastEventId);
      if (Number.isInteger(id) && id > 0) {
        if (id <= lastEventId) return;
        lastEventId = id;
      }
      if (name === "message.done") {
        // The last event: close now, or EventSource would reconnect when the
        // server ends the response.
        finished = true;
        source.close();
      }
      handlers[name]?.(JSON.parse(event.data));
    });
  }
  source.addEventListener("open", () => handlers.onConnectionChange?.("open"));
  source.addEventListener("error", () => {
    if (finished) return;
    // CONNECTING: the browser retries by itself, resuming with Last-Event-ID.
    // CLOSED: it gave up (a non-200 answer, or a 204 for "nothing more").
    const state = source.readyState === EventSource.CLOSED ? "lost" : "reconnecting";
    handlers.onConnectionChange?.(state);
  });

  return {
    close() {
      finished = true;
      source.close();
    },
    lastEventId: () => lastEventId,
  };
}
