//! The proxy's side of authorization: asks the live rule set about each
//! connection or request, counts and logs the decision, and watches rule
//! changes so open connections that become denied are closed.

use tracing::info;

use super::http::ConnInfo;
use crate::authz::{authorize, Connection, Decision, DefaultPolicy, HttpRequest, LiveRules};
use crate::identity::TrustDomain;

/// Everything a decision needs besides the connection itself.
pub struct Policy {
    pub rules: LiveRules,
    pub td: TrustDomain,
    pub default: DefaultPolicy,
    /// Let `%2F` and `%5C` through in paths instead of answering 400.
    pub allow_encoded_slash: bool,
    /// Where each request's decision goes for its access log line.
    pub access_log: super::access_log::AccessLog,
}

fn connection(conn: &ConnInfo) -> Connection<'_> {
    Connection {
        peer: &conn.peer,
        source: conn.source.ip().to_canonical(),
        port: conn.target.port(),
    }
}

impl Policy {
    /// Decides an opaque (non-HTTP) connection.
    pub fn authorize_tcp(&self, conn: &ConnInfo) -> Decision {
        let decision = self.decide_tcp(conn);
        self.record(conn, &decision);
        decision
    }

    /// Whether an opaque connection would be allowed, without counting or
    /// logging the decision (the one that lets it through does that).
    pub fn allows_tcp(&self, conn: &ConnInfo) -> bool {
        self.decide_tcp(conn).allowed
    }

    fn decide_tcp(&self, conn: &ConnInfo) -> Decision {
        let rules = self.rules.current();
        authorize(&rules, &self.td, self.default, &connection(conn), None)
    }

    /// Resolves, with the deciding rule's name, when a newly loaded rule set
    /// denies this connection — an opaque one (`http` = `None`) or an
    /// upgraded one, judged by the request that upgraded it; never while it
    /// stays allowed.
    pub async fn denied_later(&self, conn: &ConnInfo, http: Option<&RequestFacts>) -> String {
        let mut updates = self.rules.subscribe();
        loop {
            if updates.changed().await.is_err() {
                return std::future::pending().await;
            }
            let rules = updates.borrow_and_update().clone();
            let request = http.map(RequestFacts::as_request);
            let decision = authorize(
                &rules,
                &self.td,
                self.default,
                &connection(conn),
                request.as_ref(),
            );
            if !decision.allowed {
                self.rules.metrics().count_terminated(&decision.rule);
                return decision.rule;
            }
        }
    }

    /// Counts a decision and logs the audit rules that matched.
    pub(super) fn record(&self, conn: &ConnInfo, decision: &Decision) {
        self.rules.metrics().record(decision);
        for audit in &decision.audits {
            info!(peer = %conn.peer, port = conn.target.port(), rule = %audit, decision = decision.verdict(), "audit rule matched");
        }
        super::access_log::note(&self.access_log, conn, decision);
    }
}

/// An owned copy of the request facts a decision used, kept for as long as
/// an upgraded (WebSocket) connection lives so it can be judged again.
pub struct RequestFacts {
    pub method: String,
    pub path: String,
    pub host: Option<String>,
    pub headers: http::HeaderMap,
}

impl RequestFacts {
    pub fn as_request(&self) -> HttpRequest<'_> {
        HttpRequest {
            method: &self.method,
            path: &self.path,
            host: self.host.as_deref(),
            headers: &self.headers,
        }
    }
}
