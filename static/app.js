/**
 * The chat page: the chat list, the open chat, the composer and the reply
 * being written. All HTTP goes through api.js; all element building through
 * views.js. The open chat's ID lives in the URL hash (#chat_…), so a reload or
 * a shared link opens the same chat.
 */

import * as api from "./api.js";
import { chatListItem, chatTitle, h, ReplyView, userMessageView } from "./views.js";

const $ = (id) => document.getElementById(id);

const elements = {
  chatList: $("chat-list"),
  chatListStatus: $("chat-list-status"),
  loadMore: $("load-more"),
  newChat: $("new-chat"),
  menuToggle: $("menu-toggle"),
  scrim: $("scrim"),
  title: $("chat-title"),
  chatActions: $("chat-actions"),
  renameButton: $("rename-button"),
  renameForm: $("rename-form"),
  renameInput: $("rename-input"),
  renameCancel: $("rename-cancel"),
  deleteButton: $("delete-button"),
  deleteDialog: $("delete-dialog"),
  deleteDialogTitle: $("delete-dialog-title"),
  scroller: $("scroller"),
  messages: $("messages"),
  empty: $("empty"),
  notice: $("notice"),
  composer: $("composer"),
  input: $("composer-input"),
  send: $("send-button"),
  stop: $("stop-button"),
};

const state = {
  /** Chats known to the sidebar, by ID. */
  chats: new Map(),
  /** Cursor for the next page of chats (the last ID of the last page), or null. */
  nextChatsAfter: null,
  /** The last attempt to load the chat list failed (its status shows a Retry). */
  chatListFailed: false,
  /** The open chat's ID; null for a new chat not created yet. */
  chatId: null,
  /** Bumped on every navigation, so that a slow load for a chat left meanwhile is dropped. */
  navigation: 0,
  /** The reply being followed: { chatId, messageId, view, stream }, or null. */
  reply: null,
  /** True from pressing Send until the server has answered it. */
  sending: false,
  /** Whether the message area follows the end as text arrives (see scrollToEnd). */
  followEnd: true,
};

// ---------------------------------------------------------------- notices

/**
 * Shows an error (or other news) above the composer, with an optional action
 * button such as "Retry". One notice at a time: a new one replaces the old.
 */
function showNotice(text, action = null) {
  const parts = [h("span", { class: "notice-text", text })];
  if (action) {
    const button = h("button", { type: "button", class: "button", text: action.label });
    button.addEventListener("click", () => {
      hideNotice();
      elements.input.focus(); // the button is gone: leave the focus somewhere useful
      action.run();
    });
    parts.push(button);
  }
  const dismiss = h("button", {
    type: "button",
    class: "icon-button",
    "aria-label": "Dismiss",
    text: "\u00d7",
  });
  dismiss.addEventListener("click", hideNotice);
  parts.push(dismiss);
  elements.notice.replaceChildren(...parts);
  elements.notice.hidden = false;
}

function hideNotice() {
  elements.notice.hidden = true;
  elements.notice.replaceChildren();
}

/** Words for an error from api.js, for a notice. */
function describeError(error, doing) {
  if (error instanceof api.NetworkError) return `Could not ${doing}: the service is unreachable.`;
  if (error instanceof api.ApiError) {
    // A 422's detail is a list of problems, each with a readable `msg`.
    const detail = Array.isArray(error.detail)
      ? error.detail.map((problem) => problem.msg ?? JSON.stringify(problem)).join("; ")
      : String(error.detail ?? `HTTP ${error.status}`);
    return `Could not ${doing}: ${detail}`;
  }
  return `Could not ${doing}: ${error.message}`;
}

// ---------------------------------------------------------------- sidebar

/** Adds or updates chats in the sidebar and redraws it, newest created first. */
function rememberChats(chats) {
  for (const chat of chats) state.chats.set(chat.id, chat);
  renderChatList();
}

function renderChatList() {
  const chats = [...state.chats.values()].sort((a, b) => b.created_at.localeCompare(a.created_at));
  // Redrawing replaces the links: keep the keyboard focus on the same chat.
  const focusedId = document.activeElement?.dataset?.chatId;
  elements.chatList.replaceChildren(
    ...chats.map((chat) => chatListItem(chat, chat.id === state.chatId)),
  );
  if (focusedId)
    elements.chatList.querySelector(`[data-chat-id="${CSS.escape(focusedId)}"]`)?.focus();
  elements.loadMore.hidden = state.nextChatsAfter === null;
  // After a failed load the status holds the error and its Retry button.
  if (!state.chatListFailed)
    elements.chatListStatus.textContent = chats.length ? "" : "No chats yet.";
}

/** Loads the next page of the chat list (the first one when `after` is null). */
async function loadChats(after = null) {
  elements.loadMore.disabled = true;
  try {
    const page = await api.listChats({ after });
    const last = page.data.at(-1);
    state.nextChatsAfter = page.has_more && last ? last.id : null;
    state.chatListFailed = false;
    rememberChats(page.data);
  } catch (error) {
    state.chatListFailed = true;
    elements.chatListStatus.replaceChildren(describeError(error, "load the chats"), " ");
    const retry = h("button", { type: "button", class: "link-button", text: "Retry" });
    retry.addEventListener("click", () => loadChats(after));
    elements.chatListStatus.append(retry);
  } finally {
    elements.loadMore.disabled = false;
  }
}

/** A chat changed (renamed here, or by the server's `chat.updated`). */
function chatChanged(chat) {
  rememberChats([chat]);
  if (chat.id === state.chatId) showTitle(chat);
}

function showTitle(chat) {
  elements.title.textContent = chat ? chatTitle(chat) : "New chat";
  document.title = chat ? `${chatTitle(chat)} \u2013 Chat` : "Chat";
  elements.chatActions.hidden = !chat;
}

/** On a phone the sidebar is a drawer; these open and close it. */
function setDrawer(open) {
  document.body.classList.toggle("drawer-open", open);
  elements.menuToggle.setAttribute("aria-expanded", String(open));
}

// ---------------------------------------------------------------- the open chat

/** Empties the message area; `note` is shown in it (e.g. "Loading…"). */
function clearMessages(note = null) {
  elements.messages.replaceChildren();
  elements.empty.hidden = note === null;
  elements.empty.textContent = note ?? "";
}

/**
 * Keeps the newest text in view, unless the user scrolled up to read.
 * Whether to follow is decided by where the user last scrolled to, not by
 * where the content now ends: one render can add more than a screenful.
 */
function scrollToEnd({ force = false } = {}) {
  if (force) state.followEnd = true;
  if (state.followEnd) elements.scroller.scrollTop = elements.scroller.scrollHeight;
}

function noteScrollPosition() {
  const { scrollTop, scrollHeight, clientHeight } = elements.scroller;
  state.followEnd = scrollHeight - scrollTop - clientHeight < 40;
}

/** Opens the chat named by the URL hash, or a blank new chat. */
async function openFromHash() {
  const chatId = decodeURIComponent(location.hash.slice(1));
  if (chatId) await openChat(chatId);
  else openDraft();
}

/** A blank page for a new chat, which is created when its first message is sent. */
function openDraft() {
  leaveChat();
  state.chatId = null;
  showTitle(null);
  clearMessages("Start a conversation: type a message below.");
  renderChatList();
  elements.input.focus();
}

/** Stops following the open chat's reply: the server keeps writing it. */
function leaveChat() {
  state.navigation += 1;
  state.reply?.stream.close();
  state.reply = null;
  hideNotice();
  cancelRename();
  updateComposer();
}

async function openChat(chatId) {
  leaveChat();
  const navigation = state.navigation;
  state.chatId = chatId;
  showTitle(state.chats.get(chatId) ?? null);
  if (!state.chats.has(chatId)) elements.title.textContent = "Loading\u2026";
  renderChatList();
  clearMessages("Loading\u2026");
  try {
    const [chat, messages] = await Promise.all([api.getChat(chatId), api.listMessages(chatId)]);
    if (navigation !== state.navigation) return; // the user went elsewhere meanwhile
    chatChanged(chat);
    showHistory(chatId, messages);
  } catch (error) {
    if (navigation !== state.navigation) return;
    showTitle(null);
    elements.chatActions.hidden = true;
    if (error instanceof api.ApiError && error.status === 404) {
      clearMessages("This chat does not exist: it may have been deleted.");
      state.chats.delete(chatId);
      renderChatList();
    } else {
      clearMessages("");
      showNotice(describeError(error, "open this chat"), {
        label: "Retry",
        run: () => openChat(chatId),
      });
    }
  }
}

/** Draws the history; re-attaches to a reply that is still being written. */
function showHistory(chatId, messages) {
  clearMessages(messages.length ? null : "No messages yet: say hello.");
  for (const message of messages) {
    if (message.role === "user") {
      elements.messages.append(userMessageView(message));
    } else if (message.status === "in_progress") {
      // The stream replays the reply from its first event, so start from an
      // empty view: showing the stored text as well would double it.
      const view = new ReplyView({ ...message, content: "", tool_calls: [] });
      elements.messages.append(view.element);
      followReply(chatId, message.id, view);
    } else {
      elements.messages.append(new ReplyView(message).element);
    }
  }
  scrollToEnd({ force: true });
}

// ---------------------------------------------------------------- the reply in progress

/**
 * Follows a reply's event stream into its view until `message.done`.
 * `after` is the last event already shown (0: replay from the start);
 * `url` is the stream's address when the server named it (a send's Location).
 */
function followReply(chatId, messageId, view, after = 0, url = null) {
  state.reply?.stream.close();
  const reply = { chatId, messageId, view, stream: null };
  const isCurrent = () => state.reply === reply;
  reply.stream = api.followReply(
    url ?? api.replyStreamUrl(chatId, messageId, after),
    {
      "message.delta": ({ delta }) => view.appendText(delta),
      "tool.call": ({ tool_call }) => view.upsertTool(tool_call),
      "tool.result": ({ tool_call }) => view.upsertTool(tool_call),
      "chat.updated": (chat) => chatChanged(chat),
      "message.done": (message) => {
        // The final message is the truth, even if pieces were missed.
        view.finish(message);
        if (isCurrent()) endReply();
      },
      onConnectionChange: (connection) => {
        if (!isCurrent()) return;
        if (connection === "open") view.setConnectionNote(null);
        else if (connection === "reconnecting")
          view.setConnectionNote("Connection lost, reconnecting\u2026");
        else settleLostReply(reply);
      },
    },
    { after },
  );
  state.reply = reply;
  updateComposer();
}

/**
 * The stream ended without `message.done` (the browser gave up on it): ask
 * for the message itself; if it is still being written, offer to re-attach
 * after the last event shown.
 */
async function settleLostReply(reply) {
  const { chatId, messageId, view } = reply;
  const resume = () => followReply(chatId, messageId, view, reply.stream.lastEventId());
  try {
    const message = await api.getMessage(chatId, messageId);
    if (state.reply !== reply) return;
    if (message.status !== "in_progress") {
      view.finish(message);
      endReply();
      return;
    }
    view.setConnectionNote("Connection lost.");
    showNotice("Lost the connection to the reply.", { label: "Reconnect", run: resume });
  } catch (error) {
    if (state.reply !== reply) return;
    view.setConnectionNote("Connection lost.");
    showNotice(describeError(error, "follow the reply"), { label: "Retry", run: resume });
  }
}

function endReply() {
  state.reply?.stream.close();
  state.reply = null;
  updateComposer();
}

/** Asks the server to stop the reply; its stream then ends with `cancelled`. */
async function stopReply() {
  const reply = state.reply;
  if (!reply) return;
  elements.stop.disabled = true;
  try {
    const message = await api.cancelReply(reply.chatId, reply.messageId);
    // Normally message.done arrives too; this covers a stream that is down.
    if (state.reply === reply && message.status !== "in_progress") {
      reply.view.finish(message);
      endReply();
    }
  } catch (error) {
    showNotice(describeError(error, "stop the reply"));
  } finally {
    elements.stop.disabled = false;
  }
}

// ---------------------------------------------------------------- composer

/**
 * While a reply is being written (or a send is on its way) the composer
 * cannot send, and Stop replaces Send. The text box stays editable so the
 * next message can be drafted meanwhile.
 */
function updateComposer() {
  const busy = state.sending || state.reply !== null;
  elements.send.disabled = busy;
  elements.send.hidden = state.reply !== null;
  elements.stop.hidden = state.reply === null;
  elements.composer.setAttribute("aria-busy", String(busy));
}

/** A fresh Idempotency-Key; crypto.getRandomValues also works over plain http. */
function newIdempotencyKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
}

/**
 * Sends the composer's text. A retry after a network error passes the same
 * idempotency key, so the server never stores the message twice.
 */
async function sendMessage(content, idempotencyKey = newIdempotencyKey()) {
  if (state.sending || state.reply) return;
  state.sending = true;
  updateComposer();
  hideNotice();
  const navigation = state.navigation;
  let chatId = state.chatId;
  try {
    if (chatId === null) {
      chatId = await createChatForDraft();
    }
    const sent = await api.sendMessage(chatId, content, idempotencyKey);
    if (navigation !== state.navigation) return; // the user went to another chat meanwhile
    elements.input.value = "";
    clearMessagesNote();
    elements.messages.append(userMessageView(sent.userMessage));
    const view = new ReplyView(sent.assistantMessage);
    elements.messages.append(view.element);
    scrollToEnd({ force: true });
    state.sending = false;
    followReply(chatId, sent.assistantMessage.id, view, 0, sent.streamUrl);
  } catch (error) {
    if (navigation !== state.navigation) return;
    handleSendError(error, chatId, content, idempotencyKey);
  } finally {
    state.sending = false;
    updateComposer();
  }
}

/** Creates the chat for a draft and makes it the open one, without reloading the page. */
async function createChatForDraft() {
  const chat = await api.createChat();
  state.chatId = chat.id;
  // replaceState, not location.hash: a hashchange would reload the chat.
  history.replaceState(null, "", `#${chat.id}`);
  chatChanged(chat);
  return chat.id;
}

function clearMessagesNote() {
  elements.empty.hidden = true;
}

function handleSendError(error, chatId, content, idempotencyKey) {
  if (error instanceof api.ApiError && error.status === 409) {
    // A reply is already being written in this chat (another tab, say); the
    // body names it (`message_id`). Re-opening the chat attaches to it.
    showNotice("This chat is still writing a reply. Wait for it, or stop it, then send again.", {
      label: "Show that reply",
      run: () => openChat(chatId),
    });
  } else if (error instanceof api.NetworkError) {
    showNotice("Your message was not sent: the service is unreachable.", {
      label: "Retry",
      run: () => sendMessage(content, idempotencyKey),
    });
  } else {
    showNotice(describeError(error, "send the message"));
  }
}

function submitComposer() {
  const content = elements.input.value;
  if (!content.trim()) return;
  sendMessage(content);
}

// ---------------------------------------------------------------- rename and delete

function startRename() {
  const chat = state.chats.get(state.chatId);
  if (!chat) return;
  elements.renameInput.value = chat.title ?? "";
  elements.renameForm.hidden = false;
  elements.title.hidden = true;
  elements.chatActions.hidden = true;
  elements.renameInput.focus();
  elements.renameInput.select();
}

function cancelRename() {
  if (elements.renameForm.hidden) return;
  elements.renameForm.hidden = true;
  elements.title.hidden = false;
  elements.chatActions.hidden = state.chatId === null;
}

async function saveRename() {
  const chatId = state.chatId;
  const title = elements.renameInput.value.trim();
  cancelRename();
  try {
    chatChanged(await api.updateChat(chatId, { title: title || null }));
  } catch (error) {
    showNotice(describeError(error, "rename the chat"));
  }
  elements.renameButton.focus();
}

/** Asks first, in a modal dialog; deleting also stops a reply in progress. */
function confirmDelete() {
  const chat = state.chats.get(state.chatId);
  if (!chat) return;
  elements.deleteDialogTitle.textContent = `Delete \u201c${chatTitle(chat)}\u201d?`;
  elements.deleteDialog.returnValue = "";
  elements.deleteDialog.showModal();
}

async function deleteOpenChat() {
  const chatId = state.chatId;
  try {
    await api.deleteChat(chatId);
  } catch (error) {
    if (!(error instanceof api.ApiError && error.status === 404)) {
      showNotice(describeError(error, "delete the chat"));
      return;
    }
  }
  state.chats.delete(chatId);
  if (state.chatId === chatId) {
    history.pushState(null, "", location.pathname + location.search);
    openDraft();
  } else {
    renderChatList();
  }
}

// ---------------------------------------------------------------- wiring

function wireEvents() {
  window.addEventListener("hashchange", () => {
    setDrawer(false);
    openFromHash();
  });

  elements.newChat.addEventListener("click", () => {
    setDrawer(false);
    if (location.hash) history.pushState(null, "", location.pathname + location.search);
    openDraft();
  });
  elements.loadMore.addEventListener("click", () => loadChats(state.nextChatsAfter));

  elements.menuToggle.addEventListener("click", () => {
    setDrawer(!document.body.classList.contains("drawer-open"));
  });
  elements.scrim.addEventListener("click", () => setDrawer(false));
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && document.body.classList.contains("drawer-open")) {
      setDrawer(false);
      elements.menuToggle.focus();
    }
  });

  elements.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    submitComposer();
  });
  elements.input.addEventListener("keydown", (event) => {
    // Enter sends, Shift+Enter is a new line; Enter that confirms an input
    // method's composition (Japanese, Chinese…) is not a send.
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      if (!elements.send.disabled) submitComposer();
    }
  });
  elements.stop.addEventListener("click", stopReply);

  elements.renameButton.addEventListener("click", startRename);
  elements.renameForm.addEventListener("submit", (event) => {
    event.preventDefault();
    saveRename();
  });
  elements.renameCancel.addEventListener("click", () => {
    cancelRename();
    elements.renameButton.focus();
  });
  elements.renameInput.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      event.preventDefault();
      cancelRename();
      elements.renameButton.focus();
    }
  });

  elements.deleteButton.addEventListener("click", confirmDelete);
  elements.deleteDialog.addEventListener("close", () => {
    if (elements.deleteDialog.returnValue === "delete") deleteOpenChat();
  });

  // Follow the growing reply, a frame at a time (see ReplyView.render).
  elements.messages.addEventListener("reply-rendered", () => scrollToEnd());
  elements.scroller.addEventListener("scroll", noteScrollPosition, { passive: true });
}

wireEvents();
loadChats();
openFromHash();
