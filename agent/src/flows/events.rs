//! Decoding flow start/end events (and endpoint announcements) from the records of the
//! data path's `FLOW_EVENTS` ring buffer; the reader is in [`super::rings`].
//!
//! Records are decoded with a bounds-checked decoder: the ring buffer is shared memory
//! written by the kernel side, and the decoder is a fuzzing target, so it never trusts
//! a length or an enum value.

use backplane_common::{
    FlowEvent, FlowEventKind,
    flow::{DIR_HI_TO_LO, DIR_LO_TO_HI, FAMILY_IPV4, FAMILY_IPV6},
};
use thiserror::Error;

/// A ring buffer record that is not a valid [`FlowEvent`] (or payload sample, see
/// [`super::payload`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("flow event of {got} bytes, expected {expected}")]
    WrongLength { expected: usize, got: usize },

    #[error("flow event of unknown kind {0}")]
    UnknownKind(u8),

    #[error("flow event with invalid direction {0}")]
    BadDirection(u8),

    #[error("flow event with unknown address family {0}")]
    BadFamily(u8),
}

/// Size of one ring buffer record.
pub const FLOW_EVENT_SIZE: usize = size_of::<FlowEvent>();

/// Decoding of ring buffer records into [`FlowEvent`]s.
pub trait FlowEventDecode: Sized {
    /// Decodes one record; rejects a wrong length, an unknown kind, direction or family.
    fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError>;
}

impl FlowEventDecode for FlowEvent {
    fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() != FLOW_EVENT_SIZE {
            return Err(DecodeError::WrongLength { expected: FLOW_EVENT_SIZE, got: bytes.len() });
        }
        // SAFETY: the length is exactly that of a FlowEvent, which is repr(C) and made of
        // integers and integer arrays only (every bit pattern is valid); the read is
        // unaligned because a byte slice promises no alignment.
        let event: FlowEvent = unsafe { bytes.as_ptr().cast::<FlowEvent>().read_unaligned() };
        if FlowEventKind::from_u8(event.kind).is_none() {
            return Err(DecodeError::UnknownKind(event.kind));
        }
        if event.direction != DIR_LO_TO_HI && event.direction != DIR_HI_TO_LO {
            return Err(DecodeError::BadDirection(event.direction));
        }
        if event.key.family != FAMILY_IPV4 && event.key.family != FAMILY_IPV6 {
            return Err(DecodeError::BadFamily(event.key.family));
        }
        Ok(event)
    }
}

/// Encodes an event as the data path writes it (tests and fuzz seeds).
#[must_use]
pub fn to_bytes(event: &FlowEvent) -> Vec<u8> {
    // SAFETY: FlowEvent is repr(C) without implicit padding (asserted in
    // backplane-common), so all of its bytes are initialised.
    let bytes = unsafe { std::slice::from_raw_parts(std::ptr::from_ref(event).cast::<u8>(), FLOW_EVENT_SIZE) };
    bytes.to_vec()
}

#[cfg(test)]
mod tests {
    use backplane_common::FlowKey;

    use super::*;

    fn sample() -> FlowEvent {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[10, 0, 0, 1]);
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&[10, 0, 0, 2]);
        let (key, dir) = FlowKey::canonical(&a, 40000, &b, 80, 0, 6, FAMILY_IPV4);
        FlowEvent {
            key,
            ts_ns: 123_456_789,
            ifindex: 7,
            kind: FlowEventKind::Start as u8,
            direction: dir,
            verdict: 0,
            tcp_flags: 0x02,
        }
    }

    #[test]
    fn round_trip() {
        let event = sample();
        let bytes = to_bytes(&event);
        assert_eq!(bytes.len(), 56);
        assert_eq!(FlowEvent::from_bytes(&bytes), Ok(event));
    }

    #[test]
    fn unaligned_input_decodes() {
        let event = sample();
        let mut bytes = vec![0u8];
        bytes.extend(to_bytes(&event));
        assert_eq!(FlowEvent::from_bytes(&bytes[1..]), Ok(event));
    }

    #[test]
    fn rejects_wrong_length() {
        let bytes = to_bytes(&sample());
        for len in [0, 1, 55, 57, 64] {
            let mut b = bytes.clone();
            b.resize(len, 0);
            assert_eq!(FlowEvent::from_bytes(&b), Err(DecodeError::WrongLength { expected: 56, got: len }));
        }
    }

    #[test]
    fn rejects_unknown_kind_direction_family() {
        let mut event = sample();
        event.kind = 0;
        assert_eq!(FlowEvent::from_bytes(&to_bytes(&event)), Err(DecodeError::UnknownKind(0)));
        // 3 is `Announce` now; a kind no data path sends.
        event.kind = 200;
        assert_eq!(FlowEvent::from_bytes(&to_bytes(&event)), Err(DecodeError::UnknownKind(200)));
        let mut event = sample();
        event.direction = 2;
        assert_eq!(FlowEvent::from_bytes(&to_bytes(&event)), Err(DecodeError::BadDirection(2)));
        let mut event = sample();
        event.key.family = 0;
        assert_eq!(FlowEvent::from_bytes(&to_bytes(&event)), Err(DecodeError::BadFamily(0)));
    }

    #[test]
    fn end_event_decodes() {
        let mut event = sample();
        event.kind = FlowEventKind::End as u8;
        event.tcp_flags = 0x11;
        assert_eq!(FlowEvent::from_bytes(&to_bytes(&event)).map(|e| e.kind), Ok(2));
    }
}
