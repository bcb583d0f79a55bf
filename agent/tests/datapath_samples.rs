//! Payload samples under `BPF_PROG_TEST_RUN`: the first three payload-carrying packets of
//! a flow are copied (their first 512 bytes) into `PAYLOAD_SAMPLES`, then none; bare
//! headers are not sampled; the copy is exact from both programs.

mod common;

use aya::maps::{MapData, RingBuf};
use backplane::flows::payload::{decode_sample, parse_record};
use backplane_common::{
    flow::{DIR_HI_TO_LO, DIR_LO_TO_HI},
    maps,
    reason::Counter,
    sample::{SAMPLE_BYTES, SAMPLES_PER_FLOW},
};
use common::{datapath::TestDatapath, frames::*};

const A: [u8; 4] = [10, 0, 0, 1];
const B: [u8; 4] = [10, 0, 0, 2];

fn ring(dp: &mut TestDatapath) -> RingBuf<MapData> {
    RingBuf::try_from(dp.ebpf.take_map(maps::PAYLOAD_SAMPLES).expect("PAYLOAD_SAMPLES")).expect("a ring buffer")
}

fn drain(ring: &mut RingBuf<MapData>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        out.push(item.to_vec());
    }
    out
}

#[test]
fn the_first_three_payload_packets_of_a_flow_are_sampled_exactly() {
    let mut dp = TestDatapath::load(1024);
    let mut samples = ring(&mut dp);
    let syn = tcp4(A, 40000, B, 80, TCP_SYN);
    let request = eth(
        MAC_B,
        MAC_A,
        &[],
        0x0800,
        &ipv4(A, B, 6, &tcp(40000, 80, TCP_ACK | TCP_PSH, b"GET / HTTP/1.1\r\nHost: sampled.test\r\n\r\n")),
    );
    let reply = eth(MAC_A, MAC_B, &[], 0x0800, &ipv4(B, A, 6, &tcp(80, 40000, TCP_ACK | TCP_PSH, &[0x55; 1400])));
    dp.from_port(&syn);
    dp.from_port(&request);
    dp.from_port(&reply);
    dp.to_port(&reply);
    for _ in 0..5 {
        dp.from_port(&request);
    }
    let records = drain(&mut samples);
    assert_eq!(records.len(), usize::from(SAMPLES_PER_FLOW), "three samples, then none");
    assert_eq!(dp.counter(Counter::PayloadSamples), u64::from(SAMPLES_PER_FLOW));
    assert_eq!(dp.counter(Counter::PayloadSamplesLost) + dp.counter(Counter::PayloadSamplesSkipped), 0);

    let (first, data) = decode_sample(&records[0]).unwrap();
    assert_eq!((first.index, first.direction), (0, DIR_LO_TO_HI));
    assert_eq!(usize::from(first.captured), request.len());
    assert_eq!(data, request.as_slice(), "the frame copied byte for byte");
    assert_eq!(parse_record(&records[0]).unwrap().app.http_host.as_deref(), Some("sampled.test"));

    let (second, data) = decode_sample(&records[1]).unwrap();
    assert_eq!((second.index, second.direction), (1, DIR_HI_TO_LO));
    assert_eq!((usize::from(second.captured), second.frame_len as usize), (SAMPLE_BYTES, reply.len()));
    assert_eq!(data, &reply[..SAMPLE_BYTES], "a long frame is cut at SAMPLE_BYTES");
    // The reply seen again on its way out (TC) is not counted twice, nor sampled.
    let (third, _) = decode_sample(&records[2]).unwrap();
    assert_eq!((third.index, third.direction), (2, DIR_LO_TO_HI));
    let flows = dp.flows();
    assert_eq!(flows[0].1.samples, SAMPLES_PER_FLOW);
}

#[test]
fn a_flows_first_packet_with_payload_is_sample_zero_and_bare_frames_are_not_sampled() {
    let mut dp = TestDatapath::load(1024);
    let mut samples = ring(&mut dp);
    let query = eth(MAC_B, MAC_A, &[], 0x0800, &ipv4(A, B, 17, &udp(40001, 53, &[0x11; 40])));
    dp.from_port(&query);
    // 42 bytes of headers and 4 of payload: a frame no longer than Ethernet padding.
    let tiny = eth(MAC_B, MAC_A, &[], 0x0800, &ipv4(A, B, 17, &udp(40002, 53, &[1, 2, 3, 4])));
    dp.from_port(&tiny);
    // Egress-only traffic (from the host) is sampled by `to_port`.
    let from_host = eth(MAC_A, MAC_B, &[], 0x0800, &ipv4(B, A, 17, &udp(5000, 6000, &[0x22; 100])));
    dp.to_port(&from_host);
    let records = drain(&mut samples);
    assert_eq!(records.len(), 2, "the query and the host's datagram");
    let (q, data) = decode_sample(&records[0]).unwrap();
    assert_eq!((q.index, data), (0, query.as_slice()));
    let (h, data) = decode_sample(&records[1]).unwrap();
    assert_eq!((h.index, data), (0, from_host.as_slice()));
}
