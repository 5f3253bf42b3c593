// The client editor: URL and scope fields follow the chosen provider, grant and tenant.
// Without this file the server does the same ("Load defaults", and on save).
"use strict";
(() => {
  const form = document.querySelector("form[data-client-editor]");
  const data = document.getElementById("client-presets");
  if (!form || !data) return;
  const presets = JSON.parse(data.textContent);
  const FIELDS = ["authorize_url", "token_url", "device_url", "scope"];
  const ALIASES = ["organizations", "common", "consumers"];
  const el = (name) => form.elements.namedItem(name);
  const provider = el("provider");
  const grant = el("grant");
  const tenant = el("tenant");

  // The defaults of a provider and grant, with {tenant} filled in.
  function defaultsFor(key, grantKey, tenantValue) {
    const preset = presets[key];
    const found = preset && preset.grants[grantKey];
    const value = (preset && preset.has_tenant && tenantValue.trim()) ||
      (preset ? preset.default_tenant : "");
    const result = {};
    for (const name of FIELDS) {
      result[name] = found ? (found[name] || "").split("{tenant}").join(value) : "";
    }
    return result;
  }

  const current = () => defaultsFor(provider.value, grant.value, tenant ? tenant.value : "");
  let previous = current();

  function limitGrants() {
    const allowed = presets[provider.value] ? presets[provider.value].grants : {};
    for (const option of grant.options) option.disabled = !(option.value in allowed);
    if (grant.selectedOptions[0] && grant.selectedOptions[0].disabled) {
      const first = Array.from(grant.options).find((o) => !o.disabled);
      if (first) grant.value = first.value;
    }
  }

  function showWhatApplies() {
    const preset = presets[provider.value] || {};
    const flags = {
      tenant: !!preset.has_tenant,
      custom: !!preset.custom,
      graph: !!(preset.microsoft || preset.custom),
      authorization_code: grant.value === "authorization_code",
      device_code: grant.value === "device_code",
    };
    for (const node of document.querySelectorAll("[data-show-if]")) {
      node.hidden = !flags[node.dataset.showIf];
      // What the grant does not use is cleared, so that nothing stale is saved.
      if (node.hidden && node.dataset.field) el(node.dataset.field).value = "";
    }
    // "organizations"/"common" name no directory: only Authorization Code can use them.
    if (tenant && flags.tenant && grant.value !== "authorization_code" &&
        ALIASES.includes(tenant.value.trim().toLowerCase())) {
      tenant.value = "";
    }
    const wanted = `${provider.value}:${grant.value}`;
    for (const node of document.querySelectorAll("[data-guide]")) {
      node.hidden = node.dataset.guide !== wanted;
    }
    const note = document.querySelector("[data-preset-note]");
    if (note) note.textContent = preset.note || "";
    for (const button of form.querySelectorAll("[data-restore]")) {
      button.hidden = !!preset.custom;
    }
  }

  // Fields the user has not changed (still the previous default, or empty) take the new default.
  function follow() {
    limitGrants();
    const next = current();
    for (const name of FIELDS) {
      const field = el(name);
      if (field && (field.value.trim() === "" || field.value === previous[name])) {
        field.value = next[name];
      }
    }
    previous = next;
    showWhatApplies();
  }

  provider.addEventListener("change", follow);
  grant.addEventListener("change", follow);
  if (tenant) tenant.addEventListener("input", follow);
  form.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-restore]");
    if (!button) return;
    const name = button.dataset.restore;
    el(name).value = current()[name];
    el(name).focus();
  });
  for (const node of document.querySelectorAll("[data-no-script]")) node.hidden = true;
  limitGrants();
  showWhatApplies();
})();
