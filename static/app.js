// Small progressive enhancements; every page works without this file.
"use strict";
document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-copy]");
  if (!button) return;
  const source = document.querySelector(button.dataset.copy);
  if (!source) return;
  const text = source.value !== undefined ? source.value : source.textContent;
  const done = () => {
    const label = button.textContent;
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = label; }, 1500);
  };
  // Without the clipboard API (plain http) the text is selected, to be copied by hand.
  const byHand = () => {
    if (source.select) { source.select(); } else {
      const range = document.createRange();
      range.selectNodeContents(source);
      window.getSelection().removeAllRanges();
      window.getSelection().addRange(range);
    }
    try { if (document.execCommand("copy")) done(); } catch (e) { /* selected is enough */ }
  };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text.trim()).then(done, byHand);
  } else {
    byHand();
  }
});

// Times: the page says "2 minutes ago" (computed by the server); the hover title adds the
// person's local time to the absolute UTC one.
(() => {
  const local = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
  for (const node of document.querySelectorAll("time[datetime][title]")) {
    const at = new Date(node.getAttribute("datetime"));
    if (!Number.isNaN(at.getTime())) node.title = `${local.format(at)} (your time) · ${node.title}`;
  }
})();

// A form that failed comes back with its error summary focused, so that it is read first.
(() => {
  const summary = document.querySelector("[data-error-summary]");
  if (summary) summary.focus();
})();

// Confirmations that ask for typing: the button is enabled once the text matches.
(() => {
  for (const input of document.querySelectorAll("input[data-must-equal]")) {
    const button = input.form && input.form.querySelector("button[type=submit]");
    if (!button) continue;
    const check = () => {
      button.disabled = input.value.trim().toLowerCase() !== input.dataset.mustEqual;
    };
    input.addEventListener("input", check);
    check();
  }
})();
