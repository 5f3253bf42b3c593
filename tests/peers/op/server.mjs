// Loopback OAuth 2.0 server for the Auth-Email end-to-end tests.
//
// The real peer is panva's `oidc-provider` (npm); only glue lives here: configuration, a
// directory of test accounts, a small login + consent UI a browser can drive, and a few
// test-only endpoints under /_test/ (this is the test peer, not the product).
//
// Accounts: ANY address <local>@example.test or <local>@example.net signs in with the
// password "pw-<local>" (e.g. alice@example.test / pw-alice), so each test can use a fresh
// mailbox. Tokens carry `email` (introspection answer) which Dovecot compares with the SASL
// user: the signed-in user, or for client_credentials the client's `mailbox` metadata.
//
// Env: OP_HOST (127.0.0.1), OP_PORT (24080), OP_PIDFILE, OP_STATE (dir for the signing key),
//      OP_REDIRECT_URIS (space separated, for the static `mailproxy` client),
//      OP_REGISTRATION_TOKEN (initial access token for dynamic registration; empty = open).
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { URLSearchParams } from 'node:url';
import Provider, { errors } from 'oidc-provider';

const HOST = process.env.OP_HOST || '127.0.0.1';
const PORT = Number(process.env.OP_PORT || 24080);
const ISSUER = `http://${HOST}:${PORT}`;
const REDIRECTS = (process.env.OP_REDIRECT_URIS || `http://${HOST}:24099/callback`)
  .split(/\s+/)
  .filter(Boolean);
const STATE = process.env.OP_STATE || path.join(process.cwd(), 'state');
const REGISTRATION_TOKEN = process.env.OP_REGISTRATION_TOKEN || '';
const DEFAULT_ACCESS_TTL = 600;
const DEFAULT_REFRESH_TTL = 86400;
fs.mkdirSync(STATE, { recursive: true });

// ---- accounts ------------------------------------------------------------------------------
const DOMAINS = ['example.test', 'example.net'];
const ACCOUNT_RE = new RegExp(`^([a-z0-9][a-z0-9._+-]{0,63})@(${DOMAINS.map((d) => d.replace('.', '\\.')).join('|')})$`);
const passwordFor = (email) => {
  const m = ACCOUNT_RE.exec(email);
  return m ? `pw-${m[1]}` : undefined;
};

// ---- signing key (kept across restarts so id_token signatures stay verifiable) ------------
const keyFile = path.join(STATE, 'jwks.json');
if (!fs.existsSync(keyFile)) {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = { ...privateKey.export({ format: 'jwk' }), kid: 'k1', use: 'sig', alg: 'RS256' };
  fs.writeFileSync(keyFile, JSON.stringify({ keys: [jwk] }), { mode: 0o600 });
}
const jwks = JSON.parse(fs.readFileSync(keyFile, 'utf8'));

// ---- per-client metadata used by the ttl functions ----------------------------------------
const positiveInt = (v) => Number.isInteger(v) && v > 0;
const clientTtl = (client, prop, fallback) =>
  positiveInt(client?.[prop]) ? client[prop] : fallback;

const DEVICE_CODE = 'urn:ietf:params:oauth:grant-type:device_code';

const configuration = {
  jwks,
  cookies: { keys: ['auth-email-test-op-cookie-key'] },
  clients: [
    {
      // general confidential client (the product can use it when a test needs no special one)
      client_id: 'mailproxy',
      client_secret: 'mailproxy-secret',
      grant_types: ['authorization_code', 'refresh_token', 'client_credentials', DEVICE_CODE],
      response_types: ['code'],
      redirect_uris: REDIRECTS,
      token_endpoint_auth_method: 'client_secret_basic',
      mailbox: 'alice@example.test',
    },
    {
      // resource server credentials Dovecot uses for RFC 7662 introspection
      client_id: 'dovecot',
      client_secret: 'dovecot-secret',
      grant_types: [],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_post',
    },
  ],
  extraClientMetadata: {
    // mailbox: whose mail a client_credentials token may read; *_ttl: lifetimes in seconds;
    // delegate + delegated_mailbox: tokens of that signed-in user are good for that (shared)
    // mailbox, as an Exchange mailbox permission would make them.
    properties: ['mailbox', 'access_token_ttl', 'refresh_token_ttl', 'device_code_ttl', 'delegate', 'delegated_mailbox'],
    validator(ctx, key, value) {
      if (value === undefined || value === null) return;
      if (['mailbox', 'delegate', 'delegated_mailbox'].includes(key) && (typeof value !== 'string' || !value.includes('@'))) {
        throw new errors.InvalidClientMetadata(`${key} must be an email address`);
      }
      if (key.endsWith('_ttl') && !positiveInt(value)) {
        throw new errors.InvalidClientMetadata(`${key} must be a positive integer (seconds)`);
      }
    },
  },
  scopes: ['openid', 'email', 'profile', 'offline_access', 'mail'],
  claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: ['name'] },
  pkce: { required: () => true },
  rotateRefreshToken: true,
  // Like Entra and Google, put the signed-in user's email into the id_token itself, so the
  // product can tell who signed in (a delegate of a shared mailbox, say).
  conformIdTokenClaims: false,
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: {
      enabled: true,
      // only the resource server (dovecot) or the token's own client may introspect
      allowedPolicy: async (ctx, client, token) =>
        client.clientId === 'dovecot' || client.clientId === token.clientId,
    },
    revocation: { enabled: true },
    registration: {
      enabled: true,
      initialAccessToken: REGISTRATION_TOKEN || false,
    },
    deviceFlow: {
      enabled: true,
      charset: 'base-20',
      mask: '****-****',
      userCodeInputSource: async (ctx, form, out, err) => {
        const msg = err ? '<p id="error">The code is incorrect or expired</p>' : '<p>Enter the code shown on your device</p>';
        ctx.body = page('Device sign-in', `${msg}${form}<button id="device-continue" type="submit" form="op.deviceInputForm">Continue</button>`);
      },
      userCodeConfirmSource: async (ctx, form, client, deviceInfo, userCode) => {
        ctx.body = page('Confirm device', `<p>Client <b id="client">${esc(client.clientId)}</b>, code <code id="user-code">${esc(userCode)}</code></p>
${form}<button id="device-confirm" type="submit" form="op.deviceConfirmForm">Continue</button>
<button id="device-abort" type="submit" form="op.deviceConfirmForm" value="yes" name="abort">Abort</button>`);
      },
      successSource: async (ctx) => {
        ctx.body = page('Device sign-in complete', '<p id="device-success">You can close this page.</p>');
      },
    },
  },
  // Dovecot needs to know which mailbox a token is good for: `email` in the token.
  extraTokenClaims: async (ctx, token) => {
    if (token.kind === 'AccessToken' && token.accountId) {
      const client = await ctx.oidc.provider.Client.find(token.clientId);
      if (client?.delegated_mailbox && client.delegate === token.accountId) return { email: client.delegated_mailbox };
      return { email: token.accountId };
    }
    if (token.kind === 'ClientCredentials') {
      const client = await ctx.oidc.provider.Client.find(token.clientId);
      if (client?.mailbox) return { email: client.mailbox };
    }
    return undefined;
  },
  ttl: {
    AccessToken: (ctx, token, client) => clientTtl(client, 'access_token_ttl', DEFAULT_ACCESS_TTL),
    ClientCredentials: (ctx, token, client) => clientTtl(client, 'access_token_ttl', DEFAULT_ACCESS_TTL),
    RefreshToken: (ctx, token, client) => clientTtl(client, 'refresh_token_ttl', DEFAULT_REFRESH_TTL),
    AuthorizationCode: 60,
    DeviceCode: (ctx, token, client) => clientTtl(client, 'device_code_ttl', 600),
    Interaction: 600,
    Session: 3600,
    Grant: 86400,
    IdToken: 600,
  },
  // a refresh token whenever the client may use the refresh_token grant (no offline_access needed)
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  findAccount: async (ctx, id) => {
    if (!passwordFor(id)) return undefined;
    return {
      accountId: id,
      claims: async () => ({ sub: id, email: id, email_verified: true, name: id.split('@')[0] }),
    };
  },
  interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` },
};

// ---- HTML helpers --------------------------------------------------------------------------
function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}
function page(title, body) {
  return `<!doctype html><html><head><meta charset="utf-8"><title>${esc(title)}</title></head><body><h1>${esc(title)}</h1>${body}</body></html>`;
}

const provider = new Provider(ISSUER, configuration);

// ---- test-only bookkeeping -----------------------------------------------------------------
const stats = { total: 0, byClient: {}, byGrantType: {}, recent: [] };
const grants = new Map(); // grantId -> { accountId, clientId }
const ccTokens = new Map(); // ClientCredentials jti -> { clientId, email }
// The legacy Resource Owner Password grant (oidc-provider has none built in): the product
// offers it for Microsoft accounts when an admin allows it, so the test bed needs a real one.
provider.registerGrantType('password', async (ctx) => {
  const { username, password } = ctx.oidc.params;
  const { client } = ctx.oidc;
  const email = String(username || '').toLowerCase();
  if (!client.grantTypeAllowed('password')) {
    throw new errors.UnauthorizedClient('the password grant is not allowed for this client');
  }
  if (!passwordFor(email) || passwordFor(email) !== password) {
    throw new errors.InvalidGrant('invalid username or password');
  }
  const { Grant, AccessToken, RefreshToken } = ctx.oidc.provider;
  const scope = 'openid email offline_access';
  const grant = new Grant({ accountId: email, clientId: client.clientId });
  grant.addOIDCScope(scope);
  const grantId = await grant.save();
  const at = new AccessToken({ accountId: email, client, grantId, scope, gty: 'password' });
  const body = { access_token: await at.save(), token_type: 'Bearer', expires_in: at.expiration, scope };
  if (client.grantTypeAllowed('refresh_token')) {
    const rt = new RefreshToken({ accountId: email, client, grantId, scope, gty: 'password' });
    body.refresh_token = await rt.save();
  }
  ctx.body = body;
}, ['username', 'password', 'scope']);

provider.on('grant.saved', (g) => grants.set(g.jti, { accountId: g.accountId, clientId: g.clientId }));
provider.on('grant.destroyed', (g) => grants.delete(g.jti));
provider.on('client_credentials.saved', (t) => ccTokens.set(t.jti, { clientId: t.clientId, email: t.extra?.email }));
provider.on('client_credentials.destroyed', (t) => ccTokens.delete(t.jti));

function basicClientId(ctx) {
  const h = ctx.get('authorization') || '';
  if (!h.toLowerCase().startsWith('basic ')) return undefined;
  const dec = Buffer.from(h.slice(6), 'base64').toString();
  const i = dec.indexOf(':');
  return i < 0 ? undefined : decodeURIComponent(dec.slice(0, i).replace(/\+/g, '%20'));
}

provider.use(async (ctx, next) => {
  await next();
  if (ctx.path === '/token' && ctx.method === 'POST') {
    // counts every request that reached the token endpoint, successful or not
    const clientId = ctx.oidc?.client?.clientId || basicClientId(ctx) || ctx.oidc?.params?.client_id || 'unknown';
    const grantType = ctx.oidc?.params?.grant_type || 'unknown';
    stats.total += 1;
    stats.byClient[clientId] = (stats.byClient[clientId] || 0) + 1;
    stats.byGrantType[grantType] = (stats.byGrantType[grantType] || 0) + 1;
    stats.recent.push({ client_id: clientId, grant_type: grantType, status: ctx.status, at: Date.now() / 1000 });
    if (stats.recent.length > 2000) stats.recent.splice(0, stats.recent.length - 2000);
  }
  // RFC 7662 2.2: a token the AS will not introspect must yield {"active":false}; Dovecot
  // takes a 400 as a temporary failure ([UNAVAILABLE]) instead of a refusal.
  if (ctx.path === '/token/introspection' && ctx.status === 400 && ctx.body?.error === 'unsupported_token_type') {
    ctx.status = 200;
    ctx.body = { active: false };
  }
});
// Test-only: a client's token requests answered with a scripted refusal (status, body,
// Retry-After, content type), as a throttled or failing provider would; counted above.
const tokenBehaviour = new Map(); // client_id -> { status, body, retry_after, content_type }
provider.use(async (ctx, next) => {
  const scripted = ctx.path === '/token' && ctx.method === 'POST' && tokenBehaviour.get(basicClientId(ctx));
  if (!scripted) return next();
  ctx.status = scripted.status || 400;
  if (scripted.retry_after !== undefined) ctx.set('Retry-After', String(scripted.retry_after));
  ctx.type = scripted.content_type || 'application/json';
  ctx.body = typeof scripted.body === 'string' ? scripted.body : JSON.stringify(scripted.body || { error: 'invalid_request' });
});
provider.on('server_error', (ctx, err) => console.error('server_error', err));
provider.on('grant.error', (ctx, err) => console.error('grant.error', err.message, err.error_description || ''));
provider.on('introspection.error', (ctx, err) => console.error('introspection.error', err.message));
provider.on('registration_create.error', (ctx, err) => console.error('registration.error', err.message, err.error_description || ''));

async function revokeMatching({ email, client_id: clientId }) {
  // every grant (and its codes/access/refresh tokens) of the user and/or client
  let revokedGrants = 0;
  let revokedTokens = 0;
  for (const [grantId, g] of [...grants]) {
    if ((email && g.accountId !== email) || (clientId && g.clientId !== clientId)) continue;
    await Promise.all([
      provider.AccessToken.revokeByGrantId(grantId),
      provider.RefreshToken.revokeByGrantId(grantId),
      provider.AuthorizationCode.revokeByGrantId(grantId),
      provider.DeviceCode.revokeByGrantId(grantId),
      provider.Grant.adapter.destroy(grantId),
    ]);
    grants.delete(grantId);
    revokedGrants += 1;
  }
  for (const [jti, t] of [...ccTokens]) {
    if ((email && t.email !== email) || (clientId && t.clientId !== clientId)) continue;
    await provider.ClientCredentials.adapter.destroy(jti);
    ccTokens.delete(jti);
    revokedTokens += 1;
  }
  return { revoked_grants: revokedGrants, revoked_client_credentials: revokedTokens };
}

// ---- login + consent UI (replaces devInteractions) -----------------------------------------
const readBody = (req) =>
  new Promise((resolve, reject) => {
    let data = '';
    req.on('data', (c) => {
      data += c;
      if (data.length > 1e5) req.destroy();
    });
    req.on('end', () => resolve(data));
    req.on('error', reject);
  });
const readForm = async (req) => new URLSearchParams(await readBody(req));
const send = (res, status, body, type = 'text/html; charset=utf-8') => {
  res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' });
  res.end(body);
};
const sendJson = (res, status, obj) => send(res, status, JSON.stringify(obj), 'application/json');
const loginForm = (uid, error = '', login = '') =>
  page('Sign in', `${error ? `<p id="error" style="color:red">${esc(error)}</p>` : ''}
<form id="login-form" method="post" action="/interaction/${uid}/login" autocomplete="off">
  <label>Email <input id="login" name="login" type="text" value="${esc(login)}" required autofocus></label>
  <label>Password <input id="password" name="password" type="password" required></label>
  <button id="submit" type="submit">Sign in</button>
</form>
<p><small>Test accounts: any &lt;name&gt;@${DOMAINS.join(' or @')}, password pw-&lt;name&gt;</small></p>`);

async function interactions(req, res) {
  const m = req.url.match(/^\/interaction\/([\w-]+)(?:\/(login|confirm|abort))?(?:\?.*)?$/);
  if (!m) return send(res, 404, page('Not found', ''));
  const [, uid, action] = m;
  try {
    const details = await provider.interactionDetails(req, res);
    const { prompt, params, session, grantId } = details;
    if (details.uid !== uid) return send(res, 400, page('Bad interaction', ''));
    if (req.method === 'GET' && !action) {
      if (prompt.name === 'login') return send(res, 200, loginForm(uid, '', params.login_hint || ''));
      const client = await provider.Client.find(params.client_id);
      return send(res, 200, page('Authorize', `<p>Client <b id="client">${esc(client.clientId)}</b> requests access for <b id="account">${esc(session.accountId)}</b>, scopes: <code id="scopes">${esc(params.scope || '')}</code></p>
<form id="consent-form" method="post" action="/interaction/${uid}/confirm"><button id="allow" type="submit">Allow</button></form>
<form id="deny-form" method="post" action="/interaction/${uid}/abort"><button id="deny" type="submit">Deny</button></form>`));
    }
    if (req.method === 'POST' && action === 'login') {
      const body = await readForm(req);
      const login = (body.get('login') || '').trim().toLowerCase();
      const expected = passwordFor(login);
      if (!expected || body.get('password') !== expected) {
        return send(res, 200, loginForm(uid, 'Invalid email or password', login));
      }
      return provider.interactionFinished(req, res, { login: { accountId: login } }, { mergeWithLastSubmission: false });
    }
    if (req.method === 'POST' && action === 'confirm') {
      await readBody(req);
      const grant = grantId
        ? await provider.Grant.find(grantId)
        : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
      const d = prompt.details;
      if (d.missingOIDCScope) grant.addOIDCScope(d.missingOIDCScope.join(' '));
      if (d.missingOIDCClaims) grant.addOIDCClaims(d.missingOIDCClaims);
      if (d.missingResourceScopes) {
        for (const [ind, sc] of Object.entries(d.missingResourceScopes)) grant.addResourceScope(ind, sc.join(' '));
      }
      return provider.interactionFinished(req, res, { consent: { grantId: await grant.save() } }, { mergeWithLastSubmission: true });
    }
    if (action === 'abort') {
      await readBody(req);
      return provider.interactionFinished(req, res, { error: 'access_denied', error_description: 'End-User denied' }, { mergeWithLastSubmission: false });
    }
    return send(res, 405, page('Method not allowed', ''));
  } catch (err) {
    console.error('interaction error', err);
    return send(res, 400, page('Error', `<pre id="error">${esc(err.message)}</pre>`));
  }
}

async function testEndpoints(req, res) {
  const url = new URL(req.url, ISSUER);
  if (req.method === 'GET' && url.pathname === '/_test/stats') {
    return sendJson(res, 200, { token_requests: stats.total, by_client: stats.byClient, by_grant_type: stats.byGrantType, recent: stats.recent });
  }
  if (req.method === 'POST' && url.pathname === '/_test/stats/reset') {
    await readBody(req);
    Object.assign(stats, { total: 0, byClient: {}, byGrantType: {}, recent: [] });
    return sendJson(res, 200, { ok: true });
  }
  if (req.method === 'POST' && url.pathname === '/_test/token_behaviour') {
    // JSON body: { client_id, status, body, retry_after, content_type }; without status: normal again
    const p = JSON.parse((await readBody(req)) || '{}');
    if (!p.client_id) return sendJson(res, 400, { error: 'client_id required' });
    if (p.status) tokenBehaviour.set(p.client_id, p);
    else tokenBehaviour.delete(p.client_id);
    return sendJson(res, 200, { ok: true });
  }
  if (req.method === 'POST' && url.pathname === '/_test/revoke') {
    // body: JSON or form with `email` and/or `client_id` (at least one)
    const raw = await readBody(req);
    const isJson = (req.headers['content-type'] || '').includes('json');
    const p = isJson ? JSON.parse(raw || '{}') : Object.fromEntries(new URLSearchParams(raw));
    if (!p.email && !p.client_id) return sendJson(res, 400, { error: 'email or client_id required' });
    return sendJson(res, 200, await revokeMatching(p));
  }
  return sendJson(res, 404, { error: 'not found' });
}

const callback = provider.callback();
const server = http.createServer((req, res) => {
  if (req.url.startsWith('/interaction/')) return interactions(req, res);
  if (req.url.startsWith('/_test/')) {
    return testEndpoints(req, res).catch((err) => sendJson(res, 500, { error: String(err) }));
  }
  if (req.url === '/healthz') return send(res, 200, 'ok', 'text/plain');
  return callback(req, res);
});
server.listen(PORT, HOST, () => {
  if (process.env.OP_PIDFILE) fs.writeFileSync(process.env.OP_PIDFILE, `${process.pid}\n`);
  console.log(`oidc-provider listening on ${ISSUER} (pid ${process.pid})`);
});
const shutdown = () => {
  server.close(() => process.exit(0));
  server.closeAllConnections();
};
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
