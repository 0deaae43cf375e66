/**
 * Markdown for the model's replies, rendered safely.
 *
 * A reply is untrusted text: whatever the user pasted or the model was talked
 * into writing can end up in it. So it goes through three layers:
 *
 * 1. marked parses the Markdown, with its raw-HTML and image output replaced:
 *    HTML in a reply is shown as text, and an image becomes a plain link
 *    (an <img> would make the browser fetch its URL as soon as it is parsed).
 * 2. DOMPurify keeps only the tags and attributes that Markdown produces,
 *    and only http(s)/mailto links.
 * 3. The page's Content-Security-Policy runs no inline script, whatever slips by.
 *
 * The result is a DocumentFragment that the caller inserts with
 * replaceChildren(): the model's text never goes through innerHTML of a live
 * element (DOMPurify parses it in an inert document).
 */

import { Marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.js";

/** Escapes text for use inside the HTML that marked builds. */
function escapeHtml(text) {
  return text
    .replaceAll("&", "&amp;")
    .replaceAll("<", "&lt;")
    .replaceAll(">", "&gt;")
    .replaceAll('"', "&quot;")
    .replaceAll("'", "&#39;");
}

const marked = new Marked({
  gfm: true,
  renderer: {
    // Raw HTML (a block or an inline tag) is shown as the text it is.
    html({ text, block }) {
      return block ? `<p>${escapeHtml(text)}</p>` : escapeHtml(text);
    },
    // ![alt](url) becomes a link to the image, so that nothing loads by itself.
    image({ href, text }) {
      const label = escapeHtml(text || href);
      return `<a href="${escapeHtml(href)}">${label}</a>`;
    },
    // Task-list boxes as characters: no <input> elements inside a reply.
    checkbox({ checked }) {
      return checked ? "\u2611 " : "\u2610 ";
    },
  },
});

/** Exactly what Markdown produces; anything else is dropped by DOMPurify. */
const SANITIZE_OPTIONS = {
  ALLOWED_TAGS: [
    "a",
    "blockquote",
    "br",
    "code",
    "del",
    "em",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "hr",
    "li",
    "ol",
    "p",
    "pre",
    "strong",
    "table",
    "tbody",
    "td",
    "th",
    "thead",
    "tr",
    "ul",
  ],
  // No `style` (the CSP would block it and log an error) and no event handlers.
  ALLOWED_ATTR: ["href", "title", "class", "align", "start"],
  // Links only to web pages and mail. DOMPurify checks this pattern against
  // every attribute it does not know to be URI-safe, so name the other two.
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:)/i,
  ADD_URI_SAFE_ATTR: ["align", "start"],
  RETURN_DOM_FRAGMENT: true,
};

// Links from a reply open in a new tab and give the target page no handle
// back to this one (window.opener) and no Referer.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

/** Renders untrusted Markdown text to a sanitized DocumentFragment. */
export function renderMarkdown(text) {
  return DOMPurify.sanitize(marked.parse(text), SANITIZE_OPTIONS);
}
