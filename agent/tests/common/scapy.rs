//! A real packet tool in a lab VM: scapy (Debian's `python3-scapy`), run inside the VM's
//! namespace as a root guest runs it. Frames are written as scapy expressions
//! (`Ether(dst=...)/IP(...)/TCP(...)`), so a test reads as the attack it is.

use backplane_lab::Vm;

/// Debian's interpreter, the one `python3-scapy` is installed for (a `python3` found
/// first on `PATH` may be another).
pub const PYTHON: &str = "/usr/bin/python3";

/// Quiet scapy: no banner, no warnings about routes the lab does not have.
const PRELUDE: &str = "\
import logging
logging.getLogger('scapy').setLevel(logging.ERROR)
from scapy.all import *
conf.verb = 0
";

/// Runs python `code` in `vm` after `from scapy.all import *`; returns its stdout. Panics
/// with its output when it fails.
pub fn run(vm: &Vm, code: &str) -> String {
    vm.run(&[PYTHON, "-c", &format!("{PRELUDE}{code}\n")])
}

/// Sends `frames` (scapy expressions, each a whole frame from `Ether()` on), in order,
/// out of the VM's `eth0`.
pub fn sendp<S: AsRef<str>>(vm: &Vm, frames: &[S]) {
    let list: Vec<&str> = frames.iter().map(AsRef::as_ref).collect();
    run(vm, &format!("sendp([\n{}\n], iface='eth0')", list.join(",\n")));
}

/// A MAC as scapy reads it.
pub fn mac(bytes: [u8; 6]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}
