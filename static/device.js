// The Device Code page: submit its "Check now" form every `interval` seconds, so that the page
// continues by itself once the person signed in. Without this file they press the button.
"use strict";
(() => {
  const form = document.getElementById("device-check");
  if (!form) return;
  const seconds = Math.max(parseInt(form.dataset.interval, 10) || 5, 1);
  setTimeout(() => { form.submit(); }, seconds * 1000);
})();
