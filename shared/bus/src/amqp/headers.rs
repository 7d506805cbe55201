//! Message headers: the attempt count and dead-letter details.
//!
//! The attempt travels in `x-devfleet-attempt` (absent = 1), set on the copy
//! a retry publishes. Returns by the broker (a consumer died holding the
//! message) are counted by the quorum queue in `x-delivery-count` and added
//! on top. A copy dead-lettered by this client carries `x-devfleet-dl-*`; a
//! message the broker dead-lettered itself carries `x-death`.

use crate::memory::DELIVERY_LIMIT;
use crate::DeadLetterInfo;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;

const ATTEMPT: &str = "x-devfleet-attempt";
const DL_QUEUE: &str = "x-devfleet-dl-queue";
const DL_REASON: &str = "x-devfleet-dl-reason";
const DL_ATTEMPTS: &str = "x-devfleet-dl-attempts";
const DL_AT: &str = "x-devfleet-dl-at";
/// Set by quorum queues on a redelivered message: earlier deliveries that
/// were returned unsettled.
const DELIVERY_COUNT: &str = "x-delivery-count";
const DEATH: &str = "x-death";

/// Headers of a retry's copy.
pub(super) fn for_attempt(attempt: u32) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(ATTEMPT.into(), AMQPValue::LongLongInt(i64::from(attempt)));
    headers
}

/// Headers of a dead-lettered copy.
pub(super) fn for_dead_letter(info: &DeadLetterInfo) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(
        DL_QUEUE.into(),
        AMQPValue::LongString(LongString::from(info.queue.as_str())),
    );
    headers.insert(
        DL_REASON.into(),
        AMQPValue::LongString(LongString::from(info.reason.as_str())),
    );
    headers.insert(
        DL_ATTEMPTS.into(),
        AMQPValue::LongLongInt(i64::from(info.attempts)),
    );
    headers.insert(DL_AT.into(), AMQPValue::LongLongInt(info.at_ms));
    headers
}

fn int(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        _ => None,
    }
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn get<'a>(table: &'a FieldTable, key: &str) -> Option<&'a AMQPValue> {
    table.inner().get(key)
}

fn to_u32(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

/// The delivery's attempt: 1 on first delivery, counting retries and
/// broker redeliveries.
pub(super) fn attempt(properties: &BasicProperties, redelivered: bool) -> u32 {
    let headers = properties.headers().as_ref();
    let base = headers
        .and_then(|h| get(h, ATTEMPT))
        .and_then(int)
        .map_or(1, to_u32)
        .max(1);
    let returned = headers
        .and_then(|h| get(h, DELIVERY_COUNT))
        .and_then(int)
        .map(to_u32);
    // Classic queues (and old brokers) only say "redelivered".
    let returned = returned.unwrap_or(u32::from(redelivered));
    base.saturating_add(returned)
}

/// Why and where from a message in the dead-letter queue came, from either
/// this client's headers or the broker's `x-death`.
pub(super) fn dead_letter_info(properties: &BasicProperties) -> Option<DeadLetterInfo> {
    let headers = properties.headers().as_ref()?;
    if let Some(queue) = get(headers, DL_QUEUE).and_then(text) {
        return Some(DeadLetterInfo {
            queue,
            reason: get(headers, DL_REASON).and_then(text).unwrap_or_default(),
            attempts: get(headers, DL_ATTEMPTS).and_then(int).map_or(0, to_u32),
            at_ms: get(headers, DL_AT).and_then(int).unwrap_or(0),
        });
    }
    // The broker's own dead-lettering: the newest death comes first.
    let deaths = match get(headers, DEATH)? {
        AMQPValue::FieldArray(deaths) => deaths,
        _ => return None,
    };
    let death = deaths.as_slice().iter().find_map(|d| match d {
        AMQPValue::FieldTable(t) => Some(t),
        _ => None,
    })?;
    let reason = get(death, "reason").and_then(text).unwrap_or_default();
    let base = get(headers, ATTEMPT).and_then(int).map_or(1, to_u32);
    let attempts = match get(headers, DELIVERY_COUNT).and_then(int) {
        Some(returned) => base.saturating_add(to_u32(returned)),
        // The broker drops the count when dead-lettering; hitting the limit
        // means the last of `DELIVERY_LIMIT + 1` deliveries failed too.
        None if reason == "delivery_limit" => base.saturating_add(DELIVERY_LIMIT),
        None => base,
    };
    Some(DeadLetterInfo {
        queue: get(death, "queue").and_then(text).unwrap_or_default(),
        reason: match reason.as_str() {
            "delivery_limit" => {
                "delivery limit: handed back unsettled too many times (delivery_limit)".to_owned()
            }
            _ => format!("dead-lettered by the broker: {reason}"),
        },
        attempts,
        at_ms: get(death, "time")
            .and_then(int)
            .map_or(0, |s| s.saturating_mul(1000)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempt_counts_retries_and_returns() {
        let plain = BasicProperties::default();
        assert_eq!(attempt(&plain, false), 1);
        assert_eq!(attempt(&plain, true), 2);
        let retried = BasicProperties::default().with_headers(for_attempt(3));
        assert_eq!(attempt(&retried, false), 3);
        let mut headers = for_attempt(3);
        headers.insert(DELIVERY_COUNT.into(), AMQPValue::LongLongInt(2));
        let returned = BasicProperties::default().with_headers(headers);
        assert_eq!(attempt(&returned, true), 5);
    }

    #[test]
    fn dead_letter_headers_round_trip() {
        let info = DeadLetterInfo {
            queue: "work".into(),
            reason: "boom".into(),
            attempts: 4,
            at_ms: 1_700_000_000_000,
        };
        let properties = BasicProperties::default().with_headers(for_dead_letter(&info));
        assert_eq!(dead_letter_info(&properties), Some(info));
        assert_eq!(dead_letter_info(&BasicProperties::default()), None);
    }
}
