// Markdown -> sanitized DOM. Model output (and anything pasted in) is untrusted, so:
//   1. marked renders Markdown; raw HTML in it is shown as text, never interpreted, and images become links (an
//      image would load a URL the text chose, a known way to leak a conversation);
//   2. DOMPurify then removes whatever could still run: scripts, event handlers, javascript: URLs, style;
//   3. the page's Content-Security-Policy (no inline script, no eval, requests to this server only) backs both.
import { Marked } from './vendor/marked.esm.js';
import DOMPurify from './vendor/purify.es.mjs';

const ESCAPES = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);

const marked = new Marked({
  gfm: true,
  breaks: true,
  renderer: {
    html: ({ text }) => escapeHtml(text),
    image: ({ href, text }) => `<a href="${escapeHtml(href)}">${escapeHtml(text || href)}</a>`,
  },
});

const PURIFY = {
  FORBID_TAGS: ['img', 'style', 'form', 'input', 'button', 'textarea', 'select', 'iframe', 'object', 'embed', 'svg',
    'math', 'video', 'audio', 'source', 'picture', 'link', 'meta', 'base'],
  FORBID_ATTR: ['style'],
  RETURN_DOM_FRAGMENT: true,
};

DOMPurify.addHook('afterSanitizeAttributes', (node) => {
  if (node.nodeName === 'A') {
    node.setAttribute('target', '_blank');
    node.setAttribute('rel', 'noopener noreferrer');
  }
});

/** HTML text -> a DocumentFragment with nothing executable left in it. */
export function sanitize(html) {
  return DOMPurify.sanitize(html, PURIFY);
}

/** Markdown text -> a sanitized DocumentFragment; each code block gets a Copy button. */
export function renderMarkdown(text) {
  const fragment = sanitize(marked.parse(text));
  for (const pre of fragment.querySelectorAll('pre')) addCopyButton(pre);
  return fragment;
}

function addCopyButton(pre) {
  const wrapper = document.createElement('div');
  wrapper.className = 'code-block';
  const button = document.createElement('button');
  button.type = 'button';
  button.className = 'copy';
  button.textContent = 'Copy';
  button.setAttribute('aria-label', 'Copy code');
  button.addEventListener('click', () => copyText(pre, button));
  pre.replaceWith(wrapper);
  wrapper.append(button, pre);
}

async function copyText(pre, button) {
  try {
    if (navigator.clipboard) await navigator.clipboard.writeText(pre.textContent);
    else fallbackCopy(pre);
    button.textContent = 'Copied';
  } catch {
    fallbackCopy(pre);
    button.textContent = 'Selected';
  }
  setTimeout(() => { button.textContent = 'Copy'; }, 1500);
}

function fallbackCopy(pre) { // pages served over plain http on another host have no clipboard API
  window.getSelection().selectAllChildren(pre);
  document.execCommand('copy');
}
