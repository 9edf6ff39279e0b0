//! The commands that change the connection itself, and so take the whole `Session`: QUIT,
//! RESET, AUTH, HELLO, MONITOR and the CLIENT subcommands that set its name, its reply
//! mode, its tracking or close it. Every other command the proxy answers itself is a
//! function over a narrow context in [`local`](super::local).

use bytes::Bytes;
use tokio::time::Instant;

use super::local::{self, client_line, client_reply, hello_reply, valid_client_name};
use super::{Session, control, login, tracking};
use crate::command::CommandSpec;
use crate::resp::Request;
use crate::resp::reply::{self, Proto};
use crate::resp::request::parse_i64;
use crate::worker::ClientInfo;

impl Session {
    /// A command the proxy answers itself (route `Local`).
    pub(crate) fn local(&mut self, spec: &CommandSpec, req: &Request<'_>, now: Instant) {
        match spec.name {
            "quit" => {
                self.reply_static(reply::OK);
                self.closing = true;
            }
            "reset" => self.reset(),
            "auth" => {
                let cx = cx!(self);
                if let Some(verdict) = self.login.auth(&cx, req) {
                    self.after_login(verdict);
                }
            }
            "hello" => self.hello(req),
            "monitor" => self.monitor(req),
            "client|getname" => match &self.name {
                Some(n) => self.reply(reply::bulk(n.as_bytes())),
                None => self.reply_static(reply::null(self.proto)),
            },
            "client|setname" => {
                let name = req.arg(2);
                if !valid_client_name(name) {
                    return self.reply_static(reply::BAD_CLIENT_NAME);
                }
                self.name = (!name.is_empty()).then(|| String::from_utf8_lossy(name).into());
                self.update_info();
                self.reply_static(reply::OK);
            }
            "client|info" => {
                let line = client_line(&self.info_entry(), "client|info");
                self.reply(reply::verbatim(self.proto, line.as_bytes()));
            }
            "client|reply" => {
                let cx = cx!(self);
                client_reply(&cx, &mut self.reply_mode, req)
            }
            "client|kill" => self.closing |= local::client_kill(&cx!(self), req),
            "client|tracking" => {
                let cx = cx!(self);
                tracking::client_tracking(&cx, &mut self.tracking, &self.login, req, now);
                // (CLIENT LIST shows it.)
                self.update_info();
            }
            _ => local::answer(&mut fwd!(self), &self.login, self.laddr, spec, req, now),
        }
    }

    /// RESET: the connection as it was when it opened.
    fn reset(&mut self) {
        self.name = None;
        if self.monitor.take().is_some() {
            self.update_output_class();
        }
        // Its transaction and watches go (their connections close, so the shard forgets them).
        self.pinned = Default::default();
        // Every subscription goes (the subscriber connections close).
        self.subs = crate::session::pubsub::Subs::default();
        self.update_output_class();
        // Tracking ends (as in Redis).
        if let Some(t) = self.tracking.take() {
            self.w.tracker.remove(t.id);
        }
        // Back to the default user: authenticated only if it needs no password.
        self.login.reset(&self.w, &self.queue);
        self.switch_proto(Proto::Resp2);
        self.update_info();
        self.reply(Bytes::from_static(b"+RESET\r\n"));
    }

    /// What the session does after a login attempt: registers the new identity, or closes
    /// after too many failures in a row.
    pub(crate) fn after_login(&mut self, verdict: login::Verdict) {
        match verdict {
            login::Verdict::In => {
                self.update_info();
                tracking::sync_user(&self.tracking, &self.login);
            }
            login::Verdict::Refused { close } => self.closing |= close,
        }
    }

    /// `MONITOR`: from now on the client receives every command that passes through
    /// slotgate, from every worker. A second MONITOR gets no reply (as in Redis).
    fn monitor(&mut self, req: &Request<'_>) {
        if self.monitor.is_some() {
            return;
        }
        if self.queue.waiting() > 0 {
            // Its `+OK` must come after the replies in flight, and the lines after its `+OK`.
            // (Counted when it runs.)
            if let Some(monitor) = self.cmd {
                self.w.metrics.uncount(monitor.name);
            }
            self.deferred = Some(crate::session::pinned::Deferred::from(req));
            return;
        }
        self.reply_static(reply::OK);
        self.monitor = Some(control::Monitoring::start(&cx!(self), self.kill.clone()));
        self.update_output_class();
    }

    /// This session's CLIENT LIST entry as it is now.
    pub(crate) fn info_entry(&self) -> ClientInfo {
        ClientInfo {
            id: self.id,
            addr: self.addr,
            laddr: self.laddr,
            created: self.created,
            name: self.name.clone().unwrap_or_default(),
            user: self.login.user_name().to_string(),
            kill: self.kill.clone(),
            blocked_on: self.blocked_on.clone(),
            resp: if self.proto == Proto::Resp3 { 3 } else { 2 },
            token_exp: self.login.token.as_ref().map(|t| t.expires),
            subscribed: self.subscribed(),
            mail: self.mail.clone(),
            tracking: self.tracking.as_ref().filter(|t| t.is_active()).map(|t| {
                let m = t.mode.borrow();
                (m.bcast, m.redirect)
            }),
        }
    }

    /// Switches the reply protocol; the next command waits for in-flight replies, since it
    /// may travel over a connection of the other protocol.
    fn switch_proto(&mut self, p: Proto) {
        if self.proto != p {
            self.proto = p;
            self.barrier = true;
            if let Some(t) = &self.tracking {
                t.proto.set(p);
            }
        }
    }

    /// `HELLO [protover [AUTH user pass] [SETNAME name]]`.
    fn hello(&mut self, req: &Request<'_>) {
        let hello = match Hello::parse(req, self.proto) {
            Ok(h) => h,
            Err(e) => return self.reply(e),
        };
        if let Some((user, password)) = hello.login {
            let cx = cx!(self);
            let verdict = self.login.try_login(&cx, user, password);
            let refused = matches!(verdict, login::Verdict::Refused { .. });
            self.after_login(verdict);
            if refused {
                return;
            }
        }
        if self.login.user.is_none() {
            return self.reply_static(reply::NOAUTH_HELLO);
        }
        if let Some(n) = hello.setname {
            if !valid_client_name(n) {
                return self.reply_static(reply::BAD_CLIENT_NAME);
            }
            self.name = (!n.is_empty()).then(|| String::from_utf8_lossy(n).into());
        }
        if hello.proto != self.proto
            && (self.pinned.tx.is_some() || self.pinned.watch.is_some() || self.subscribed())
        {
            // Its dedicated connections speak the protocol they were opened with.
            return self.reply_static(reply::HELLO_SWITCH_PINNED);
        }
        self.switch_proto(hello.proto);
        self.update_info();
        self.reply(hello_reply(&cx!(self)));
    }
}

/// HELLO's arguments.
struct Hello<'r> {
    /// The protocol asked for (the current one when none is named).
    proto: Proto,
    login: Option<(&'r [u8], &'r [u8])>,
    setname: Option<&'r [u8]>,
}

impl<'r> Hello<'r> {
    /// `HELLO [protover [AUTH user pass] [SETNAME name]]`, or the error reply.
    fn parse(req: &'r Request<'_>, current: Proto) -> Result<Hello<'r>, Bytes> {
        let proto = match req.argc() {
            1 => current,
            _ => match parse_i64(req.arg(1)) {
                Some(2) => Proto::Resp2,
                Some(3) => Proto::Resp3,
                Some(_) => return Err(Bytes::from_static(reply::NOPROTO)),
                None => return Err(Bytes::from_static(reply::PROTO_NOT_INTEGER)),
            },
        };
        let mut hello = Hello {
            proto,
            login: None,
            setname: None,
        };
        let mut i = 2;
        while i < req.argc() {
            let opt = req.arg(i);
            let more = req.argc() - i - 1;
            if opt.eq_ignore_ascii_case(b"auth") && more >= 2 {
                hello.login = Some((req.arg(i + 1), req.arg(i + 2)));
                i += 3;
            } else if opt.eq_ignore_ascii_case(b"setname") && more >= 1 {
                hello.setname = Some(req.arg(i + 1));
                i += 2;
            } else {
                return Err(reply::hello_syntax(opt));
            }
        }
        Ok(hello)
    }
}
