//! API bodies and queries (HTTP and NATS): every request type decoded as
//! the handlers do, JSON bodies and URL query strings, then the
//! validation that is pure: execution tokens, state switches, the search
//! filters' states, blames and times.
#![no_main]

use axum::extract::Query;
use axum::http::Uri;
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use warden_api::executions::{ExecutionToken, Switch};
use warden_api::ops::OpError;
use warden_api::types::{
    BotsQuery, CancelBody, CancelRequest, GetRequest, ListQuery, RetryBody, StateRequest,
    StatsQuery, TakeRequest,
};
use warden_shared::error::ErrorCode;
use warden_shared::job::NewJob;
use warden_shared::{Blame, JobState};

/// Decodes `data` as the handlers do (`OpError::from_json` on failure)
/// and checks the value survives a round trip.
fn body<T>(data: &[u8]) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    match serde_json::from_slice::<T>(data) {
        Ok(v) => {
            warden_fuzz::assert_round_trips(&v);
            Some(v)
        }
        Err(e) => {
            let err = OpError::from_json(&e);
            assert_eq!(err.status, 400);
            assert!(matches!(
                err.body.code,
                ErrorCode::InvalidJson | ErrorCode::InvalidRequest
            ));
            None
        }
    }
}

fn list_filters(q: &ListQuery) {
    fn nonempty(s: &Option<String>) -> Option<&str> {
        s.as_deref().map(str::trim).filter(|s| !s.is_empty())
    }
    if let Some(s) = nonempty(&q.state) {
        let _ = s.parse::<JobState>();
    }
    if let Some(b) = nonempty(&q.blame) {
        let _ = b.parse::<Blame>();
    }
    for t in [nonempty(&q.since), nonempty(&q.until)]
        .into_iter()
        .flatten()
    {
        let _ = chrono::DateTime::parse_from_rfc3339(t);
    }
}

fn state_switch(req: &StateRequest) {
    match Switch::from_request(req) {
        Ok(Switch::Crashed { fault }) => {
            assert!(!fault.detail.is_empty() && fault.detail.len() <= 64);
        }
        Ok(Switch::Finished { outcome }) => assert!(!outcome.is_empty()),
        Ok(Switch::Running) => {}
        Err(e) => assert_eq!(e.status, 400),
    }
    if let Ok(t) = ExecutionToken::parse(&req.token) {
        assert_eq!(ExecutionToken::parse(&t.encode()).ok(), Some(t));
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = body::<NewJob>(data);
    let _ = body::<RetryBody>(data);
    let _ = body::<CancelBody>(data);
    let _ = body::<CancelRequest>(data);
    let _ = body::<GetRequest>(data);
    let _ = body::<TakeRequest>(data);
    if let Some(req) = body::<StateRequest>(data) {
        state_switch(&req);
    }
    if let Some(q) = body::<ListQuery>(data) {
        list_filters(&q);
    }
    let _ = body::<StatsQuery>(data);
    let _ = body::<BotsQuery>(data);

    let text = String::from_utf8_lossy(data);
    if let Ok(t) = ExecutionToken::parse(&text) {
        assert_eq!(ExecutionToken::parse(&t.encode()).ok(), Some(t));
    }
    // The same bytes as the query string of the GET endpoints.
    if let Ok(uri) = format!("/api/v1/jobs?{text}").parse::<Uri>() {
        if let Ok(Query(q)) = Query::<ListQuery>::try_from_uri(&uri) {
            list_filters(&q);
        }
        let _ = Query::<StatsQuery>::try_from_uri(&uri);
        let _ = Query::<BotsQuery>::try_from_uri(&uri);
    }
});
