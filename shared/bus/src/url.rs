//! Picking a backend from a URL.

use crate::{BusError, BusResult, SharedBus};
use std::sync::Arc;

/// A parsed bus URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusUrl {
    Amqp(String),
    Nats(String),
    Memory,
}

impl BusUrl {
    pub fn parse(url: &str) -> BusResult<BusUrl> {
        let invalid = |reason: &str| BusError::InvalidUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        match url.split_once("://") {
            Some(("amqp" | "amqps", rest)) if !rest.is_empty() => Ok(BusUrl::Amqp(url.to_owned())),
            Some(("nats" | "tls", rest)) if !rest.is_empty() => Ok(BusUrl::Nats(url.to_owned())),
            Some(("memory", _)) => Ok(BusUrl::Memory),
            Some((scheme, _)) => Err(invalid(&format!(
                "unknown scheme '{scheme}' (expected amqp://, nats:// or memory://)"
            ))),
            None => Err(invalid("expected amqp://, nats:// or memory://")),
        }
    }
}

/// Connects to the bus a URL names. `memory://` returns a fresh in-process
/// bus; share one [`SharedBus`] between services to connect them.
pub async fn connect(url: &str) -> BusResult<SharedBus> {
    Ok(match BusUrl::parse(url)? {
        BusUrl::Amqp(u) => Arc::new(crate::amqp::AmqpBus::connect(&u).await?),
        BusUrl::Nats(u) => Arc::new(crate::nats::NatsBus::connect(&u).await?),
        BusUrl::Memory => Arc::new(crate::memory::MemoryBus::new()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes() {
        assert!(matches!(
            BusUrl::parse("amqp://127.0.0.1:5672/%2f"),
            Ok(BusUrl::Amqp(_))
        ));
        assert!(matches!(
            BusUrl::parse("nats://127.0.0.1:4222"),
            Ok(BusUrl::Nats(_))
        ));
        assert_eq!(BusUrl::parse("memory://").unwrap(), BusUrl::Memory);
        let err = BusUrl::parse("kafka://x").unwrap_err().to_string();
        assert!(err.contains("kafka"), "{err}");
        assert!(BusUrl::parse("127.0.0.1").is_err());
    }
}
