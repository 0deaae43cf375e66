/**
 * DOM builders for the page: messages, tool-call blocks, the chat list.
 *
 * Text from the service (titles, messages, tool output) is only ever set with
 * textContent; a reply's Markdown goes through markdown.js, which sanitizes it.
 */

import { renderMarkdown } from "./markdown.js";

/** Creates an element with classes, attributes and children (strings become text). */
export function h(tag, props = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") element.className = value;
    else if (name === "text") element.textContent = value;
    else element.setAttribute(name, value === true ? "" : value);
  }
  element.append(...children.filter((child) => child !== null && child !== undefined));
  return element;
}

/** The title a chat shows until it has one. */
export function chatTitle(chat) {
  return chat.title?.trim() || "Untitled chat";
}

/** One link of the chat list; the hash is the chat's address. */
export function chatListItem(chat, isOpen) {
  const link = h("a", {
    class: "chat-link",
    href: `#${chat.id}`,
    "aria-current": isOpen ? "page" : null,
    "data-chat-id": chat.id,
    text: chatTitle(chat),
  });
  return h("li", {}, link);
}

/** A value for a tool block: strings as they are, anything else as JSON. */
function formatValue(value) {
  return typeof value === "string" ? value : JSON.stringify(value, null, 2);
}

/** One line of a value for a summary, cut short. */
function brief(value, limit = 60) {
  const text = (typeof value === "string" ? value : JSON.stringify(value)) ?? "";
  const line = text.replace(/\s+/g, " ");
  return line.length > limit ? `${line.slice(0, limit - 1)}\u2026` : line;
}

/** The one-line summary of a tool call: name, arguments and outcome. */
function toolSummary(call) {
  const finished = "result" in call || "error" in call;
  let outcome;
  if (!finished) outcome = h("span", { class: "tool-outcome", text: "running\u2026" });
  else if (call.error) outcome = h("span", { class: "tool-outcome tool-error", text: "failed" });
  else outcome = h("span", { class: "tool-outcome", text: `\u2192 ${brief(call.result, 40)}` });
  return h(
    "summary",
    {},
    h("span", { class: "tool-icon", "aria-hidden": "true", text: "\u2699" }),
    h("span", { class: "tool-name", text: call.name }),
    h("code", { class: "tool-args", text: brief(call.arguments) }),
    outcome,
  );
}

/**
 * A compact, expandable block for one tool call. `call` is the stored shape
 * ({id, name, arguments, result, error}) or a `tool.call` event's, which has
 * no result yet.
 */
export function toolCallBlock(call) {
  const finished = "result" in call || "error" in call;
  const state = !finished ? "running" : call.error ? "error" : "done";
  const body = h(
    "div",
    { class: "tool-body" },
    h("div", { class: "tool-label", text: "Arguments" }),
    h("pre", {}, h("code", { text: formatValue(call.arguments) })),
  );
  if (finished && call.error) {
    body.append(
      h("div", { class: "tool-label", text: "Error" }),
      h("pre", { class: "tool-error" }, h("code", { text: formatValue(call.error) })),
    );
  } else if (finished) {
    body.append(
      h("div", { class: "tool-label", text: "Result" }),
      h("pre", {}, h("code", { text: formatValue(call.result) })),
    );
  }
  return h(
    "details",
    { class: "tool-call", "data-tool-call-id": call.id, "data-state": state },
    toolSummary(call),
    body,
  );
}

/** What a finished reply's status line says, by status. */
const STATUS_TEXT = {
  cancelled: "Stopped",
  incomplete: "Incomplete: the reply was cut short",
  failed: "The reply failed",
};

/** A user's message: plain text, line breaks kept. */
export function userMessageView(message) {
  return h(
    "article",
    { class: "message user", "data-message-id": message.id, "aria-label": "You said" },
    h("div", { class: "bubble", text: message.content }),
  );
}

/**
 * The view of an assistant's reply, which a stream can keep updating.
 *
 * Text arrives in many small pieces; re-rendering the Markdown for each one
 * would be wasted work, so streamed pieces are rendered once per animation
 * frame. Whole texts (stored or final) are rendered at once, so that the
 * status shown always goes with the text shown.
 */
export class ReplyView {
  constructor(message) {
    this.text = "";
    this.renderScheduled = false;
    this.tools = h("div", { class: "tools" });
    this.content = h("div", { class: "content markdown" });
    this.status = h("div", { class: "status-line" });
    this.element = h(
      "article",
      { class: "message assistant", "data-message-id": message.id, "aria-label": "Assistant" },
      this.tools,
      this.content,
      this.status,
    );
    for (const call of message.tool_calls ?? []) this.upsertTool(call);
    this.setText(message.content ?? "");
    this.setStatus(message);
  }

  /** Replaces the whole text (from a stored or final message). */
  setText(text) {
    this.text = text;
    this.render();
  }

  /** Adds a streamed piece of text. */
  appendText(delta) {
    this.text += delta;
    this.scheduleRender();
  }

  scheduleRender() {
    if (this.renderScheduled) return;
    this.renderScheduled = true;
    requestAnimationFrame(() => this.render());
  }

  render() {
    this.renderScheduled = false;
    this.content.replaceChildren(renderMarkdown(this.text));
    this.element.dispatchEvent(new CustomEvent("reply-rendered", { bubbles: true }));
  }

  /** Adds a tool call, or updates it in place when its result comes. */
  upsertTool(call) {
    const block = toolCallBlock(call);
    const existing = [...this.tools.children].find((el) => el.dataset.toolCallId === call.id);
    if (existing) {
      block.open = existing.open; // keep it expanded if the user opened it
      existing.replaceWith(block);
    } else {
      this.tools.append(block);
    }
  }

  /** Shows the message's status: a typing indicator, or how it ended. */
  setStatus(message) {
    const { status } = message;
    this.element.dataset.status = status;
    // aria-busy holds screen readers' announcements until the reply is whole.
    this.element.setAttribute("aria-busy", String(status === "in_progress"));
    this.status.replaceChildren();
    if (status === "in_progress") {
      this.status.append(
        h(
          "span",
          { class: "typing", role: "img", "aria-label": "Writing" },
          h("span"),
          h("span"),
          h("span"),
        ),
      );
    } else if (STATUS_TEXT[status]) {
      const badge = h("span", { class: `badge badge-${status}`, text: STATUS_TEXT[status] });
      this.status.append(badge);
      if (message.error?.message) {
        this.status.append(h("span", { class: "status-detail", text: message.error.message }));
      }
    }
  }

  /** A note under the reply while its connection is being re-established. */
  setConnectionNote(text) {
    this.status.querySelector(".connection-note")?.remove();
    if (text) this.status.append(h("span", { class: "connection-note", text }));
  }

  /** Sets everything from the final message (message.done, or a fetch). */
  finish(message) {
    for (const call of message.tool_calls ?? []) this.upsertTool(call);
    this.setText(message.content ?? "");
    this.setStatus(message);
  }
}
