//! Who the client is: its user, and how it logged in (AUTH, HELLO AUTH, a token).
//!
//! The handlers here get a narrow context (`Cx`: the worker, the client's reply queue, its
//! id and address), never the whole `Session`: logging in cannot touch a transaction, a
//! subscription or the connection loop. What the session must do afterwards (register the new
//! identity, close after too many failures) comes back as a `Verdict`.

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{AbortOnDrop, Cx};
use crate::auth::User;
use crate::queue::ReplyQueue;
use crate::resp::Request;
use crate::resp::reply;
use crate::worker::Worker;

/// The client's identity.
#[derive(Default)]
pub(crate) struct Login {
    /// The authenticated user; `None` until AUTH when a password is required.
    pub(crate) user: Option<Arc<User>>,
    /// The user has command, key or channel restrictions (checked per command; scripts run
    /// as the user's mirror on the shards).
    pub(crate) restricted: bool,
    /// Consecutive failed AUTH attempts.
    auth_failures: u32,
    /// An AUTH (or HELLO AUTH) of this connection succeeded once: the per-address AUTH limit
    /// does not hold it back.
    logged_in: bool,
    /// The token this client authenticated with, when it did (see [`Login::token_login`]).
    pub(crate) token: Option<TokenLife>,
}

/// The expiry of the token a client authenticated with: a timer flags the session
/// (`Attention::EXPIRED`) at the deadline, unless a new AUTH replaces or drops it first.
pub(crate) struct TokenLife {
    /// The token's `exp` (Unix seconds).
    pub(crate) expires: u64,
    _timer: AbortOnDrop,
}

/// How a login attempt ended, for the session.
#[must_use]
pub(crate) enum Verdict {
    /// Logged in: the session registers its new identity.
    In,
    /// Refused (the reply is queued); `close`: too many failures in a row.
    Refused { close: bool },
}

impl Login {
    /// The authenticated user's name (`default` before AUTH, as Redis shows it).
    pub(crate) fn user_name(&self) -> &str {
        self.user.as_ref().map_or("default", |u| u.name.as_str())
    }

    /// Switches the connection's identity (AUTH, HELLO AUTH, RESET, and a reload's new rules
    /// for the same user: that keeps a token's expiry, see `drop_token`).
    pub(crate) fn set_user(&mut self, user: Arc<User>) {
        self.restricted = !user.unrestricted_access();
        self.user = Some(user);
    }

    /// A password AUTH or RESET: the connection no longer closes when the token it
    /// authenticated with expires (also if that expiry was flagged this very turn).
    pub(crate) fn drop_token(&mut self, queue: &ReplyQueue) {
        self.token = None;
        queue.unflag(crate::queue::Attention::EXPIRED);
    }

    /// RESET: back to the default user, authenticated only if it needs no password.
    pub(crate) fn reset(&mut self, w: &Worker, queue: &ReplyQueue) {
        let users = w.live().users.clone();
        self.user = None;
        self.restricted = false;
        self.drop_token(queue);
        if !users.auth_required() {
            self.set_user(users.default_user().clone());
        }
    }

    /// A valid token: its user, and a close at its expiry (replacing any earlier token's),
    /// unless the client authenticates again before.
    fn token_login(&mut self, queue: &Rc<ReplyQueue>, login: crate::token::Login) {
        self.set_user(login.user);
        self.drop_token(queue);
        let left = login
            .deadline
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        let queue = queue.clone();
        let timer = tokio::task::spawn_local(async move {
            tokio::time::sleep(left).await;
            queue.flag(crate::queue::Attention::EXPIRED);
        });
        self.token = Some(TokenLife {
            expires: login.expires,
            _timer: AbortOnDrop(timer),
        });
    }

    /// `AUTH [user] password`, against the users of `proxy.toml`. A failure keeps the
    /// identity the connection had; a success switches to the new user. `None`: refused
    /// before any check (syntax).
    pub(crate) fn auth(&mut self, cx: &Cx<'_>, req: &Request<'_>) -> Option<Verdict> {
        let (user, password) = match req.argc() {
            2 => (&b"default"[..], req.arg(1)),
            3 => (req.arg(1), req.arg(2)),
            _ => {
                cx.reply_static(reply::SYNTAX);
                return None;
            }
        };
        if req.argc() == 2 && cx.w.live().users.default_user().nopass() {
            cx.reply_static(reply::AUTH_NO_PASSWORD);
            return None;
        }
        let verdict = self.try_login(cx, user, password);
        if matches!(verdict, Verdict::In) {
            cx.reply_static(reply::OK);
        }
        Some(verdict)
    }

    /// Checks credentials; on success switches the user, on failure replies WRONGPASS and
    /// counts the failure (the session closes after too many in a row). An address with too
    /// many failed AUTHs lately (over all its connections) gets `-ERR too many failed AUTH
    /// attempts …` without a check until its wait is over.
    pub(crate) fn try_login(&mut self, cx: &Cx<'_>, user: &[u8], password: &[u8]) -> Verdict {
        let now = std::time::Instant::now();
        let shared = cx.w.shared.clone();
        let guard = &shared.auth_guard;
        let max = cx.w.live().max_auth_failures;
        // A connection that has logged in already is not held back (a client refreshing its
        // token on a live connection); a held-back attempt counts as this connection's
        // failure, so one that keeps trying is closed.
        if !self.logged_in
            && let Err(wait) = guard.check(cx.addr.ip(), now)
        {
            cx.reply(reply::auth_throttled(wait));
            self.auth_failures += 1;
            return Verdict::Refused {
                close: self.auth_failures >= max,
            };
        }
        let (users, tokens) = {
            let live = cx.w.live();
            (live.users.clone(), live.tokens.clone())
        };
        let stats = &shared.stats;
        // `Err(Some(why))`: a token was refused.
        let outcome = if let Some(u) = users.authenticate(user, password) {
            self.set_user(u);
            self.drop_token(cx.queue);
            Ok(())
        } else if !tokens.is_empty() && crate::token::looks_like_jwt(password) {
            // Tried only once the password check failed (password users are never slowed).
            match tokens.login(user, password, &users) {
                Ok(login) => {
                    stats.token_auths.fetch_add(1, Ordering::Relaxed);
                    self.token_login(cx.queue, login);
                    Ok(())
                }
                Err(why) => {
                    stats.token_auth_failures.fetch_add(1, Ordering::Relaxed);
                    why.count();
                    Err(Some(why))
                }
            }
        } else {
            Err(None)
        };
        let Err(token_refused) = outcome else {
            self.auth_failures = 0;
            self.logged_in = true;
            return Verdict::In;
        };
        self.auth_failures += 1;
        stats.auth_failures.fetch_add(1, Ordering::Relaxed);
        let budget = cx.w.live().max_auth_failures_per_address;
        let throttled = guard.failed(cx.addr.ip(), now, budget);
        if let Some(left_out) = guard.may_warn(now) {
            self.warn_auth_failure(cx, user, token_refused, throttled, left_out);
        }
        cx.reply_static(reply::WRONGPASS);
        Verdict::Refused {
            close: self.auth_failures >= max,
        }
    }

    /// The (rate-limited) warning for a failed AUTH.
    #[cold]
    fn warn_auth_failure(
        &self,
        cx: &Cx<'_>,
        user: &[u8],
        token_refused: Option<crate::token::Failure>,
        throttled: Option<Duration>,
        left_out: u64,
    ) {
        // The user name is the client's input: shown escaped and cut; never the password
        // (nor a token: only why it was refused).
        let shown: String = String::from_utf8_lossy(&user[..user.len().min(64)])
            .escape_debug()
            .collect();
        let closing = self.auth_failures >= cx.w.live().max_auth_failures;
        tracing::warn!(
            client = cx.id,
            addr = %cx.addr,
            user = %shown,
            failures = self.auth_failures,
            "AUTH failed{}{}{}{}",
            match token_refused {
                Some(why) => format!(" (token refused: {})", why.as_str()),
                None => String::new(),
            },
            match throttled {
                Some(w) => format!("; this address now waits {} s before its next AUTH", w.as_secs()),
                None => String::new(),
            },
            if closing { "; closing the connection" } else { "" },
            match left_out {
                0 => String::new(),
                n => format!(" ({n} more failed AUTHs not logged since the last line)"),
            },
        );
    }
}
