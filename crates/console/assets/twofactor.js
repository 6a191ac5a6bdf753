// The Two-factor page (`#/two-factor`): the caller enrolls an authenticator app (TOTP) for
// its own logins, confirms it with a first code and sees its recovery codes once; or
// removes it. No QR code: no QR encoder is vendored yet, so the page shows the otpauth://
// URI (a link, which phone apps open) and the secret to type in (docs/users.md).

import { h, replace, field } from "./dom.js";
import { api } from "./api.js";

const main = document.getElementById("main");

/**
 * The view for `#/two-factor`. `env`: `current(gen)`, `messages()`, `pageMessage(text, ok)`,
 * `submit(form, fn)`, `formError()`.
 */
export function twoFactorPage(env) {
  /** The enrollment in progress: the URI and secret, and the form taking the first code. */
  function confirmStep(enrollment, box) {
    const code = h("input", { name: "code", autocomplete: "one-time-code", inputmode: "numeric", required: true, maxlength: "6", pattern: "[0-9]{6}" });
    const form = h("form.card#totp-confirm", {
      onsubmit: (ev) => {
        ev.preventDefault();
        env.submit(form, async () => {
          const r = await api("POST", "totp/confirm", { code: code.value.trim() });
          replace(box,
            h("div.card#totp-recovery", {},
              h("h2", {}, "Two-factor login is on"),
              h("p", {}, "Recovery codes: each works once in place of a code, for when the app is lost. They are shown only now: keep them somewhere safe."),
              h("ul.recovery-codes", {}, r.recovery_codes.map((c) => h("li", {}, h("code", {}, c))))));
          env.pageMessage("two-factor login enabled", true);
        });
      },
    },
    h("h2", {}, "Add it to your authenticator app"),
    h("p", {}, "Open this link on the phone with the app, or choose \u201center a setup key\u201d in the app and type the key."),
    h("p", {}, h("a#totp-uri", { href: enrollment.otpauth_uri }, enrollment.otpauth_uri)),
    h("p", {}, "Setup key: ", h("code#totp-secret", {}, enrollment.secret)),
    field("First code", code, "The six digits the app shows now."),
    env.formError(),
    h("p", {}, h("button", { type: "submit" }, "Confirm")));
    return form;
  }

  return async function view(gen) {
    // The page refreshes on every cluster event (its own enrollment is one): drawn once,
    // it stays, or an enrollment in progress would be wiped.
    if (main.querySelector("#totp-enroll")) return "manual";
    const me = await api("GET", "session");
    if (!env.current(gen)) return "manual";
    const box = h("div#totp-step");
    const start = h("form.card#totp-enroll", {
      onsubmit: (ev) => {
        ev.preventDefault();
        env.submit(start, async () => {
          const e = await api("POST", "totp");
          replace(box, confirmStep(e, box));
        });
      },
    },
    h("h2", {}, "Set up an authenticator app"),
    h("p", {}, "After this, logging in needs the app's code besides the password. API tokens are not affected."),
    env.formError(),
    h("p", {}, h("button", { type: "submit" }, "Set up")));
    const remove = h("form.card#totp-remove", {
      onsubmit: (ev) => {
        ev.preventDefault();
        env.submit(remove, async () => {
          await api("DELETE", "totp");
          replace(box);
          env.pageMessage("authenticator removed: logging in needs the password only", true);
        });
      },
    },
    h("h2", {}, "Remove your authenticator"),
    env.formError(),
    h("p", {}, h("button.danger", { type: "submit" }, "Remove")));
    replace(main,
      h("h1", {}, "Two-factor login"),
      h("p", {}, `Signed in as ${me.user}.`),
      env.messages(),
      start, box, remove);
    // Nothing to poll, and a reload would hide a secret being typed in.
    return "manual";
  };
}
