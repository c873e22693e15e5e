//! Checks 8 to 11 of a certify request, as a pure function over the
//! API server's TokenReview status: the token is authentic, was minted for
//! our audience, belongs to a service account and is bound to a pod, and
//! names the same identity the caller asked for.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::code::Code;
use crate::identity::SpiffeId;

/// The `status` of a `TokenReview` (authentication.k8s.io/v1), as much of
/// it as the checks read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReviewStatus {
    pub authenticated: bool,
    pub user: UserInfo,
    /// `None` when the authenticator does not support audiences at all.
    pub audiences: Option<Vec<String>>,
    pub error: String,
}

/// The reviewed token's user.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UserInfo {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// The extra the API server adds for a token bound to a pod.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";

/// `Ok` when the review lets `requested` be signed, else the stable code and why.
pub fn judge(
    status: &ReviewStatus,
    audience: &str,
    requested: &SpiffeId,
) -> Result<(), (Code, String)> {
    if !status.authenticated || !status.error.is_empty() {
        let why = if status.error.is_empty() {
            "token not authenticated".to_string()
        } else {
            format!("token not authenticated: {}", status.error)
        };
        return Err((Code::TokenRejected, why));
    }
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.iter().any(|a| a == audience) {
        return Err((
            Code::AudienceMismatch,
            format!("token is not for audience {audience:?} (review says {audiences:?})"),
        ));
    }
    let Some((ns, sa)) = status
        .user
        .username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
    else {
        return Err((
            Code::NotBoundServiceAccount,
            format!("{:?} is not a service account", status.user.username),
        ));
    };
    let bound = status
        .user
        .extra
        .get(POD_NAME_EXTRA)
        .is_some_and(|pods| pods.iter().any(|p| !p.is_empty()));
    if !bound {
        return Err((
            Code::NotBoundServiceAccount,
            "token is not bound to a pod (use a projected service account token)".into(),
        ));
    }
    match SpiffeId::workload(requested.trust_domain(), ns, sa) {
        Ok(id) if id == *requested => Ok(()),
        Ok(id) => Err((
            Code::IdentityMismatch,
            format!("token is for {id}, not {requested}"),
        )),
        Err(e) => Err((
            Code::IdentityMismatch,
            format!("token names {ns}/{sa}: {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(user: &str, aud: Option<&[&str]>, pod: bool) -> ReviewStatus {
        let mut extra = BTreeMap::new();
        if pod {
            extra.insert(POD_NAME_EXTRA.to_string(), vec!["pod-1".to_string()]);
        }
        ReviewStatus {
            authenticated: true,
            user: UserInfo {
                username: user.into(),
                extra,
                ..Default::default()
            },
            audiences: aud.map(|a| a.iter().map(|s| s.to_string()).collect()),
            error: String::new(),
        }
    }

    #[test]
    fn judge_table() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        let sa = "system:serviceaccount:shop:web";
        let aud: &[&str] = &["portcullis-ca"];
        let mut rejected = status(sa, Some(aud), true);
        rejected.authenticated = false;
        let mut errored = status(sa, Some(aud), true);
        errored.error = "token has expired".into();
        let cases: Vec<(&str, ReviewStatus, Option<Code>)> = vec![
            ("good", status(sa, Some(aud), true), None),
            ("not authenticated", rejected, Some(Code::TokenRejected)),
            ("error set", errored, Some(Code::TokenRejected)),
            (
                "no audiences",
                status(sa, None, true),
                Some(Code::AudienceMismatch),
            ),
            (
                "other audience",
                status(sa, Some(&["api"]), true),
                Some(Code::AudienceMismatch),
            ),
            (
                "a user",
                status("alice", Some(aud), true),
                Some(Code::NotBoundServiceAccount),
            ),
            (
                "unbound",
                status(sa, Some(aud), false),
                Some(Code::NotBoundServiceAccount),
            ),
            (
                "other sa",
                status("system:serviceaccount:shop:db", Some(aud), true),
                Some(Code::IdentityMismatch),
            ),
            (
                "other ns",
                status("system:serviceaccount:bank:web", Some(aud), true),
                Some(Code::IdentityMismatch),
            ),
            (
                "smuggled colon",
                status("system:serviceaccount:shop:web:x", Some(aud), true),
                Some(Code::IdentityMismatch),
            ),
        ];
        for (name, st, want) in cases {
            let got = judge(&st, "portcullis-ca", &id).err().map(|(c, _)| c);
            assert_eq!(got, want, "{name}");
        }
    }
}
