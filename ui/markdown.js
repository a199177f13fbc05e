// Model output → safe, readable HTML. The parsing is marked's (GitHub-flavoured: tables, lists,
// fenced code, single line breaks kept), the cleaning DOMPurify's, the colouring highlight.js's —
// all three vendored in vendor/ at pinned versions (scripts/vendor-ui.sh); nothing is fetched.
//
// Model output is untrusted. Raw HTML in it is shown as text, never parsed; links survive only
// to http(s) and mailto; images are never loaded (the CSP would refuse them anyway): their alt
// text stands in. Whatever marked produces still goes through DOMPurify's allow-list.
"use strict";

const Markdown = (() => {
  const escapeHtml = (text) =>
    text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

  marked.use({
    gfm: true,
    breaks: true,
    renderer: {
      // Block and inline HTML alike: the model's markup is shown, not obeyed.
      html({ text }) {
        return escapeHtml(text);
      },
      image({ text }) {
        const alt = text.trim() || "image";
        return `<span class="image-alt" title="Images from the model are not loaded">[${escapeHtml(alt)}]</span>`;
      },
    },
  });

  const SANITIZE = {
    ALLOWED_TAGS: [
      "a", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr",
      "input", "li", "ol", "p", "pre", "span", "strong", "table", "tbody", "td", "th", "thead",
      "tr", "ul",
    ],
    ALLOWED_ATTR: ["href", "title", "class", "align", "start", "type", "checked", "disabled"],
    ALLOWED_URI_REGEXP: /^(?:https?:|mailto:)/i,
    KEEP_CONTENT: true,
  };

  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer nofollow");
    }
    // Task-list boxes only; any other input is dropped.
    if (node.tagName === "INPUT" && node.getAttribute("type") !== "checkbox") node.remove();
  });

  // A link whose target the sanitizer removed (javascript:, data:, …) becomes its text.
  function unwrapDeadLinks(root) {
    for (const a of root.querySelectorAll("a:not([href])")) a.replaceWith(...a.childNodes);
  }

  function decorateCode(root) {
    for (const code of root.querySelectorAll("pre > code")) {
      const pre = code.parentElement;
      const lang = (/(?:^|\s)language-([\w+#.-]+)/.exec(code.className) || [])[1] || "";
      if (lang && hljs.getLanguage(lang)) {
        // highlight.js escapes the text it is given: its output is markup of its own spans only.
        code.innerHTML = hljs.highlight(code.textContent, { language: lang, ignoreIllegals: true }).value;
        code.classList.add("hljs");
      }
      const block = document.createElement("div");
      block.className = "code-block";
      const head = document.createElement("div");
      head.className = "code-head";
      const label = document.createElement("span");
      label.className = "code-lang";
      label.textContent = lang || "text";
      const copy = document.createElement("button");
      copy.type = "button";
      copy.className = "copy-code";
      copy.textContent = "Copy";
      copy.setAttribute("aria-label", `Copy ${lang || "text"} code`);
      head.append(label, copy);
      pre.replaceWith(block);
      block.append(head, pre);
    }
  }

  // Wide tables scroll inside their own box, never the page.
  function wrapTables(root) {
    for (const table of root.querySelectorAll("table")) {
      const wrap = document.createElement("div");
      wrap.className = "table-wrap";
      table.replaceWith(wrap);
      wrap.append(table);
    }
  }

  // While an answer streams its text ends mid-construct. Rendered as is, "**bo" would show its
  // asterisks until the closing pair arrives, "[site](http://exa" a bracket soup, a table's first
  // row a line of pipes. This closes what is open and holds back a last line that is markup only.
  function settlePartial(text) {
    const fences = (text.match(/^\s*(```|~~~)/gm) || []).length;
    if (fences % 2 === 1) return text; // inside a code block: marked renders it as code already
    const cut = text.lastIndexOf("\n");
    const head = text.slice(0, cut + 1);
    let last = text.slice(cut + 1);
    // A table row before its delimiter row, a lone bullet or heading mark: not yet content.
    if (/^\s*(\|.*|[#>*+-]+|\d+[.)]?|[=-]+)\s*$/.test(last)) last = "";
    // An unfinished link or image: its text only, for now.
    last = last.replace(/!?\[([^\]]*)(\]\([^)]*)?$/, "$1");
    // An opening mark with nothing after it yet.
    last = last.replace(/(^|\s)[*~`]+$/, "$1");
    const para = head.slice(head.lastIndexOf("\n\n") + 1) + last;
    if ((para.match(/`/g) || []).length % 2 === 1) return head + last + "`";
    const prose = para.replace(/`[^`]*`/g, "");
    let closers = "";
    if ((prose.match(/\*\*/g) || []).length % 2 === 1) closers = "**";
    if ((prose.match(/~~/g) || []).length % 2 === 1) closers = "~~" + closers;
    const singles = prose.replace(/\*\*/g, "").replace(/^\s*\* /gm, "");
    if ((singles.match(/\*/g) || []).length % 2 === 1) closers = "*" + closers;
    return head + last.replace(/\s+$/, "") + closers;
  }

  /** Renders `source` into `el`; `partial` while the answer is still streaming. */
  function render(el, source, partial = false) {
    const html = marked.parse(partial ? settlePartial(source) : source);
    const fragment = DOMPurify.sanitize(html, { ...SANITIZE, RETURN_DOM_FRAGMENT: true });
    unwrapDeadLinks(fragment);
    decorateCode(fragment);
    wrapTables(fragment);
    el.replaceChildren(fragment);
  }

  return { render };
})();
