#!/bin/sh
# /init of the QEMU guest that `cargo xtask test-kernel` boots (see
# xtask/src/kernel_guest.rs): backplane on Debian 12's stock kernel. It builds a lab of
# three VMs (network namespaces on veth ports of a bridge), runs the agent with
# /etc/bptest/rules.yaml (xtask/kernel-guest/rules.yaml) and reports on the console:
#
#   BPTEST <check> PASS
#   BPTEST <check> FAIL <detail>
#   BPINFO <what>             for the record, never a verdict (the xtask echoes these)
#   <source>| <line>          output of a command, e.g. `agent1| ...` for the first agent
#   BPTEST DONE               the end was reached; then the guest powers off
#
# The xtask wants a PASS from every check it knows and DONE. A check that cannot run
# because an earlier one failed prints FAIL "skipped: ...". No `set -e`: each step is
# checked where it matters, and the script always ends in `finish`.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export RUST_BACKTRACE=1
# Debian's busybox shell runs its own applets before anything on PATH: the real
# iproute2 and nft are called through these functions.
ip() { /usr/sbin/ip "$@"; }
tc() { /usr/sbin/tc "$@"; }
nft() { /usr/sbin/nft "$@"; }

BP=/usr/bin/backplane
RULES=/etc/bptest/rules.yaml
SOCKET=/run/bp.sock
PIN_DIR=/sys/fs/bpf/backplane/guest
# Seconds the agent may take to answer on its socket (loading its programs: the
# verifier is slow under TCG), and then to list the three ports as attached (it attaches
# the ports that exist as it starts; a failed port is tried again 30 s later).
AGENT_START_SECS=180
AGENT_PORTS_SECS=20
# The lab: each VM is a network namespace whose eth0 is the peer of the port bpv-<vm>.
WEB=10.70.0.1
DB=10.70.0.2
DEV=10.70.0.3

pass() { echo "BPTEST $1 PASS"; }
fail() {
    _check=$1
    shift
    echo "BPTEST $_check FAIL $*"
}
# report CHECK PROBLEMS: PASS when PROBLEMS is empty.
report() {
    if [ -z "$2" ]; then pass "$1"; else fail "$1" "$2"; fi
}
info() { echo "BPINFO $*"; }
# Copies stdin to the console with each line prefixed by `$1| `.
prefixed() { sed "s/^/$1| /"; }
# One line out of a file, for a FAIL detail.
one_line() { tr '\n' ' ' <"$1" | cut -c1-400; }
uptime_s() { cut -d. -f1 /proc/uptime; }

finish() {
    info "guest uptime $(cut -d' ' -f1 /proc/uptime) s"
    echo "BPTEST DONE"
    poweroff -f
    # Not reached; should it be, init exits, the kernel panics (panic=-1) and QEMU,
    # started with -no-reboot, exits.
    exit 1
}

# ---- boot -------------------------------------------------------------------------------

# The firmware's last escape sequences end without a newline.
echo
boot_problems=
mount -t proc proc /proc || boot_problems="$boot_problems proc;"
mount -t sysfs sysfs /sys || boot_problems="$boot_problems sysfs;"
mount -t devtmpfs devtmpfs /dev || boot_problems="$boot_problems devtmpfs;"
mount -t tmpfs tmpfs /run || boot_problems="$boot_problems /run;"
mount -t tmpfs tmpfs /tmp || boot_problems="$boot_problems /tmp;"
mount -t bpf bpf /sys/fs/bpf || boot_problems="$boot_problems bpffs;"
[ -e /sys/kernel/btf/vmlinux ] || boot_problems="$boot_problems no /sys/kernel/btf/vmlinux;"
report boot "${boot_problems:+cannot mount:$boot_problems}"
info "uname -r: $(uname -r)"
info "backplane --version: $("$BP" --version 2>&1)"

load_modules() {
    for module in $(cat /etc/bptest/modules); do
        if ! insmod "/lib/modules/bptest/$module.ko" 2>/run/insmod.err; then
            fail modules "insmod $module: $(one_line /run/insmod.err)"
            return 1
        fi
    done
    pass modules
}
load_modules || finish

# ---- traffic helpers ----------------------------------------------------------------------

# ping_from VM ADDR: one echo request; true when its reply came within 2 s.
ping_from() { ip netns exec "$1" ping -c 1 -W 2 "$2" >/dev/null 2>&1; }
# ping_passes VM ADDR: the same with one retry, for flows that must pass (the first
# echo of a pair also waits for ARP, which TCG makes slow).
ping_passes() { ping_from "$1" "$2" || ping_from "$1" "$2"; }

alive() {
    [ -r "/proc/$1/stat" ] && [ "$(sed 's/^.*) \(.\).*$/\1/' "/proc/$1/stat")" != Z ]
}

# The listeners' stdin: a FIFO that this shell holds open for writing and never writes
# to. A listener whose stdin ended would close its side first and keep the port in
# TIME_WAIT, and the next listener could not bind it.
mkfifo /run/nc.stdin
exec 3<>/run/nc.stdin

# tcp_from VM ADDR PORT LISTENER_VM: LISTENER_VM listens on PORT (busybox nc), VM
# connects to ADDR:PORT and sends a line; true when the listener received it. What
# happened is in /run/nc.log.
tcp_from() {
    rm -f /run/nc.got
    # /usr/sbin/ip, not the function: in the background a function runs in a subshell,
    # and $! must be nc itself for the kill below.
    /usr/sbin/ip netns exec "$4" nc -l -p "$3" </run/nc.stdin >/run/nc.got 2>/run/nc.listener &
    _listener=$!
    _tries=0
    while [ "$_tries" -lt 50 ] && ! ip netns exec "$4" netstat -ltn 2>/dev/null | grep -q ":$3 "; do
        sleep 0.1
        _tries=$((_tries + 1))
    done
    echo bptest-payload | ip netns exec "$1" nc -w 3 "$2" "$3" >/run/nc.client 2>&1
    _client=$?
    # After a connection the listener ends once it has read the client's close.
    _tries=0
    while [ "$_client" -eq 0 ] && [ "$_tries" -lt 50 ] && alive "$_listener"; do
        sleep 0.1
        _tries=$((_tries + 1))
    done
    kill "$_listener" 2>/dev/null
    wait "$_listener" 2>/dev/null
    echo "client exit status $_client: $(cat /run/nc.client); listener received $(wc -c </run/nc.got) bytes:" \
        "$(cat /run/nc.listener)" >/run/nc.log
    grep -q bptest-payload /run/nc.got
}

# Each of these appends to $problems what went against expectations.
expect_ping_passes() { ping_passes "$2" "$3" || problems="$problems $1 icmp dropped;"; }
expect_ping_dropped() { ping_from "$2" "$3" && problems="$problems $1 icmp passed;"; }
expect_tcp_passes() {
    tcp_from "$2" "$3" "$4" "$5" || problems="$problems $1 tcp/$4 failed ($(one_line /run/nc.log));"
}
expect_tcp_dropped() { tcp_from "$2" "$3" "$4" "$5" && problems="$problems $1 tcp/$4 passed;"; }

# ---- the lab, checked without an agent ----------------------------------------------------

make_lab() {
    ip link add br0 type bridge || return 1
    ip link set br0 up || return 1
    for vm in web:$WEB db:$DB dev:$DEV; do
        name=${vm%%:*}
        addr=${vm#*:}
        ip netns add "$name" &&
            ip link add "bpv-$name" type veth peer name eth0 netns "$name" &&
            ip link set "bpv-$name" master br0 up &&
            ip -n "$name" link set lo up &&
            ip -n "$name" addr add "$addr/24" dev eth0 &&
            ip -n "$name" link set eth0 up || return 1
    done
}

if ! make_lab >/run/lab.err 2>&1; then
    fail lab "cannot build the lab: $(one_line /run/lab.err)"
    finish
fi
# The controls of the agent's checks: without an agent every flow passes.
problems=
expect_ping_passes web-db web $DB
expect_ping_passes dev-db dev $DB
expect_ping_passes db-web db $WEB
expect_tcp_passes web-db web $DB 5432 db
expect_tcp_passes dev-db dev $DB 5432 db
report lab "$problems"

# nftables' bridge family, when the xtask shipped nft: a drop rule for dev's address.
if [ -x /usr/sbin/nft ]; then
    if nft add table bridge bptest 2>/run/nft.err &&
        nft add chain bridge bptest forward '{ type filter hook forward priority 0; policy accept; }' 2>>/run/nft.err &&
        nft add rule bridge bptest forward ip saddr $DEV drop 2>>/run/nft.err; then
        problems=
        expect_ping_dropped dev-db dev $DB
        expect_ping_passes web-db web $DB
        nft delete table bridge bptest || problems="$problems cannot delete the table;"
        report nft-bridge "$problems"
    else
        fail nft-bridge "nft: $(one_line /run/nft.err)"
        nft delete table bridge bptest 2>/dev/null
    fi
fi

# ---- the agent ------------------------------------------------------------------------------

if "$BP" kernel --help >/dev/null 2>&1; then
    info "backplane kernel --programs:"
    timeout 300 "$BP" kernel --programs 2>&1 | prefixed "BPINFO kernel"
else
    info "backplane kernel: not available yet (this build has no such subcommand)"
fi

if "$BP" check "$RULES" >/run/check.out 2>&1; then
    pass rules
else
    fail rules "$(one_line /run/check.out)"
fi

AGENT_PID=
# start_agent N: the Nth agent, in the background, its output in /run/agentN.log.
start_agent() {
    "$BP" run --rules "$RULES" --interfaces 'bpv-*' --node guest --pin-dir "$PIN_DIR" \
        --socket "$SOCKET" --state-dir /run/bpstate --metrics-addr none >"/run/agent$1.log" 2>&1 &
    AGENT_PID=$!
}

# wait_for_ports: true once `backplane status` lists the three ports; else WHY says why.
wait_for_ports() {
    _started=$(uptime_s)
    _deadline=$((_started + AGENT_START_SECS))
    _answered=
    while [ "$(uptime_s)" -lt "$_deadline" ]; do
        if ! alive "$AGENT_PID"; then
            wait "$AGENT_PID"
            WHY="the agent exited (status $?) after $(($(uptime_s) - _started)) s"
            return 1
        fi
        if "$BP" status --socket "$SOCKET" >/run/status.out 2>&1; then
            if [ "$(grep -cE '^  bpv-(web|db|dev) ' /run/status.out)" -eq 3 ]; then
                info "agent ready after $(($(uptime_s) - _started)) s"
                return 0
            fi
            if [ -z "$_answered" ]; then
                _answered=$(uptime_s)
                _deadline=$((_answered + AGENT_PORTS_SECS))
            fi
        fi
        sleep 1
    done
    if [ -z "$_answered" ]; then
        WHY="the agent did not answer on $SOCKET within $AGENT_START_SECS s"
    else
        WHY="the agent answered after $((_answered - _started)) s, but \`backplane status\`"
        WHY="$WHY did not list the three ports $AGENT_PORTS_SECS s later"
    fi
    return 1
}

# agent_up CHECK N: starts the Nth agent and reports CHECK; on failure the agent's output
# goes to the console right away, with its first error line in the FAIL detail.
agent_up() {
    rm -f /run/status.out
    start_agent "$2"
    if wait_for_ports; then
        pass "$1"
        # The head of the status (programs, how they attach, the ports), and what the
        # kernel shows of one port's TC hooks.
        sed '/^flow table:/,$d' /run/status.out | prefixed "status$2"
        for hook in ingress egress; do
            tc filter show dev bpv-web "$hook" 2>&1 | prefixed "tc $hook"
        done
        return 0
    fi
    fail "$1" "$WHY; $(grep -m1 -iE 'error|panic' "/run/agent$2.log" | cut -c1-400)"
    [ -s /run/status.out ] && sed '/^flow table:/,$d' /run/status.out | prefixed "status$2"
    stop_agent
    prefixed "agent$2" <"/run/agent$2.log"
    return 1
}

# stop_agent: SIGINT, and SIGKILL if the agent is still there 10 s later.
stop_agent() {
    kill -INT "$AGENT_PID" 2>/dev/null
    _tries=0
    while [ "$_tries" -lt 100 ] && alive "$AGENT_PID"; do
        sleep 0.1
        _tries=$((_tries + 1))
    done
    kill -9 "$AGENT_PID" 2>/dev/null
    wait "$AGENT_PID" 2>/dev/null
}

skip_rest() {
    for check in "$@"; do fail "$check" "skipped: $SKIPPED"; done
}

if agent_up agent-start 1; then
    problems=
    expect_ping_passes web-db web $DB
    expect_tcp_passes web-db web $DB 5432 db
    report allowed "$problems"

    # Denied: dev reaches nothing. Control: web -> db passes at the same time.
    problems=
    expect_ping_dropped dev-db dev $DB
    expect_tcp_dropped dev-db dev $DB 5432 db
    expect_ping_passes "web-db (control)" web $DB
    report denied "$problems"

    # Reverse: db may answer web but not open a flow towards it.
    problems=
    expect_ping_dropped db-web db $WEB
    expect_ping_passes "web-db (control)" web $DB
    report reverse "$problems"

    # The agent dies: its programs stay attached (pinned) and go on enforcing.
    kill -9 "$AGENT_PID"
    wait "$AGENT_PID" 2>/dev/null
    prefixed agent1 </run/agent1.log
    problems=
    alive "$AGENT_PID" && problems="$problems the agent survived kill -9;"
    expect_ping_dropped dev-db dev $DB
    expect_ping_dropped db-web db $WEB
    expect_ping_passes web-db web $DB
    report no-agent "$problems"

    # A second agent adopts the pinned data path and enforces the same rules.
    if agent_up adopt 2; then
        problems=
        expect_ping_dropped dev-db dev $DB
        expect_ping_dropped db-web db $WEB
        expect_ping_passes web-db web $DB
        expect_tcp_passes web-db web $DB 5432 db
        report adopted-enforces "$problems"
        stop_agent
        prefixed agent2 </run/agent2.log
    else
        SKIPPED="the second agent did not start"
        skip_rest adopted-enforces
    fi
else
    SKIPPED="the first agent did not start"
    skip_rest allowed denied reverse no-agent adopt adopted-enforces
fi

finish
