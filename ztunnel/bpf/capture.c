// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
//
// Trellis in-pod capture: two tc programs on an enrolled pod's interface, inside the pod's
// network namespace, where ztunnel's listeners for that pod live.
//
// egress:  a TCP SYN the pod sends (and every later packet of a flow ztunnel is proxying) is
//          turned around to the same interface's ingress, marked STEER_MARK. ztunnel's own
//          packets carry PROXY_MARK and leave untouched, as do flows that predate enrollment.
// ingress: a steered SYN is assigned to the 15001 listener with bpf_sk_assign; the destination
//          stays intact, so the accepted socket's local address is the original destination.
//          A SYN from outside goes to the 15006 listener, except HBONE on 15008, which reaches
//          its listener directly, and the node's own probes (source-NATed to PROBE_SOURCE on the
//          node, see capture/probes.rs), which reach the pod untouched. Steered packets of
//          established flows go to their socket.
//          STEER_MARK selects a policy route `local 0.0.0.0/0 dev lo`, so the stack delivers
//          packets for foreign addresses locally, as TPROXY does.
//
// With no listener (ztunnel is not running) a captured SYN is dropped: fail closed.
//
// The mesh carries IPv4 only. Every pod has a link-local IPv6 address on its bridge, so TCP over
// IPv6 would go around ztunnel (no mTLS, no policy): both programs let through only ICMPv6
// (neighbour discovery, and MLD behind a hop-by-hop header) and UDP over IPv6, as UDP over IPv4
// passes, and drop the rest (fail closed). Frames of any EtherType but IPv4, IPv6 and ARP are
// dropped too: the stack could still turn them into IP after tc (a second VLAN tag).

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

// Set by the loader.
volatile const __u32 PROXY_MARK = 0x539;
volatile const __u32 STEER_MARK = 0x53a;
// 169.254.7.127, network byte order.
volatile const __u32 PROBE_SOURCE = 0x7f07fea9;

#define OUTBOUND_PORT 15001
#define INBOUND_PLAINTEXT_PORT 15006
#define HBONE_PORT 15008

enum stat {
    STAT_OUTBOUND = 0,   // outbound connections steered to 15001
    STAT_INBOUND = 1,    // inbound plaintext connections steered to 15006
    STAT_NO_LISTENER = 2,// SYNs dropped because ztunnel was not listening
    STAT_PROBE = 3,      // probes from the node, passed to the pod
    STAT_IPV6 = 4,       // IPv6 packets other than ICMPv6 and UDP, dropped
    STAT_FRAGMENT = 5,   // fragments of TCP over IPv4, or TCP packets too short to read, dropped
    STAT_OTHER = 6,      // frames neither IPv4, IPv6 nor ARP (still VLAN-tagged, say), and IPv4
                         // protocols other than TCP, UDP, ICMP, IGMP and SCTP (tunnels), dropped
    STAT_MAX = 7,
};

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, STAT_MAX);
    __type(key, __u32);
    __type(value, __u64);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} trellis_stats SEC(".maps");

static __always_inline void count(__u32 which)
{
    __u64 *v = bpf_map_lookup_elem(&trellis_stats, &which);
    if (v)
        *v += 1;
}

// Whether an IPv6 packet is one the mesh lets pass: ICMPv6 (neighbour discovery, and MLD,
// which travels behind a hop-by-hop header) and UDP, as UDP over IPv4 passes. Everything else
// could be TCP or hide it (behind extension headers, or in a tunnel), so it is refused.
static __always_inline int ipv6_allowed(struct __sk_buff *skb)
{
    const __u32 ip6 = sizeof(struct ethhdr);
    __u8 next;
    if (bpf_skb_load_bytes(skb, ip6 + offsetof(struct ipv6hdr, nexthdr), &next, 1))
        return 0;
    if (next == IPPROTO_HOPOPTS) {
        __u8 after;
        if (bpf_skb_load_bytes(skb, ip6 + sizeof(struct ipv6hdr), &after, 1))
            return 0;
        return after == IPPROTO_ICMPV6;
    }
    return next == IPPROTO_ICMPV6 || next == IPPROTO_UDP;
}

// Decides a frame that is not IPv4: ARP passes, IPv6 as `ipv6_allowed` says, and any other
// EtherType is dropped, since the stack could still turn it into IP after these programs ran (a
// frame that keeps a second VLAN tag after the one the kernel strips before tc, say).
static __always_inline int refuse_other(struct __sk_buff *skb)
{
    if (skb->protocol == bpf_htons(ETH_P_ARP))
        return TC_ACT_OK;
    if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
        if (ipv6_allowed(skb))
            return TC_ACT_OK;
        count(STAT_IPV6);
        return TC_ACT_SHOT;
    }
    count(STAT_OTHER);
    return TC_ACT_SHOT;
}

struct flow {
    struct bpf_sock_tuple tuple;
    int syn; // a connection's first packet: SYN without ACK
};

// IPv4 "more fragments" flag and fragment offset, in `frag_off`.
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

// Parses Ethernet + IPv4 + TCP. Returns 0 for a TCP/IPv4 packet, FRAGMENT for a fragment of one,
// a negative value for what passes uncaptured, and one of the reasons below for what is refused.
//
// A fragment is never parsed: the first one can be too short to show the TCP flags, and the
// stack reassembles the segment only after tc, so a SYN sent in fragments would reach the pod's
// own stack around ztunnel. Callers drop fragments (fail closed); TCP sets DF and finds the path
// MTU instead, so a legitimate connection does not send them.
//
// A TCP packet whose headers cannot be read is dropped the same way (UNREADABLE): the stack
// would drop a truncated one anyway, and a pull can also fail for want of memory on a packet the
// stack would accept.
//
// And an IPv4 protocol other than TCP, UDP, ICMP, IGMP and SCTP is refused (FOREIGN): it could
// carry TCP to a tunnel device in the pod, whose decapsulated packets never pass these programs.
// Once the ipip or gre module is loaded (Calico's IPIP mode does), a fallback `tunl0` or `gre0`
// appears in every new namespace and takes such packets from anyone.
#define FRAGMENT 1
#define UNREADABLE 2
#define FOREIGN 3

static __always_inline int ipv4_passes(__u8 protocol)
{
    return protocol == IPPROTO_UDP || protocol == IPPROTO_ICMP || protocol == IPPROTO_IGMP ||
           protocol == IPPROTO_SCTP;
}
static __always_inline int parse(struct __sk_buff *skb, struct flow *f)
{
    if (skb->protocol != bpf_htons(ETH_P_IP))
        return -1;
    // The IP header is copied out, so that what decides a packet's fate needs no pull: a
    // fragment can be shorter than an IP and a TCP header together, and a pull can fail.
    struct iphdr ip;
    if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr), &ip, sizeof(ip)) || ip.ihl < 5)
        return -1; // not a whole IPv4 header: the stack drops it
    if (ip.protocol != IPPROTO_TCP)
        return ipv4_passes(ip.protocol) ? -1 : FOREIGN;
    if (ip.frag_off & bpf_htons(IP_MF | IP_OFFSET))
        return FRAGMENT;
    // Headers of a GSO packet may not all be in the linear area.
    __u32 l4 = sizeof(struct ethhdr) + ip.ihl * 4;
    if (bpf_skb_pull_data(skb, l4 + sizeof(struct tcphdr)) < 0)
        return UNREADABLE;
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct tcphdr *tcp = data + l4;
    if ((void *)(tcp + 1) > end)
        return UNREADABLE;
    f->tuple.ipv4.saddr = ip.saddr;
    f->tuple.ipv4.daddr = ip.daddr;
    f->tuple.ipv4.sport = tcp->source;
    f->tuple.ipv4.dport = tcp->dest;
    f->syn = tcp->syn && !tcp->ack;
    return 0;
}

// What to do with an IPv4 packet `parse` did not accept: drop a TCP fragment, a TCP packet it
// could not read, or a foreign protocol; pass the rest (UDP, ICMP, IGMP, SCTP).
static __always_inline int refuse_unparsed(int parsed)
{
    if (parsed < 0)
        return TC_ACT_OK;
    count(parsed == FOREIGN ? STAT_OTHER : STAT_FRAGMENT);
    return TC_ACT_SHOT;
}

// A socket of a connection (not a listener) matching the packet, or NULL. Caller releases.
static __always_inline struct bpf_sock *connection(struct __sk_buff *skb, struct bpf_sock_tuple *t)
{
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, t, sizeof(t->ipv4), BPF_F_CURRENT_NETNS, 0);
    if (sk && sk->state == BPF_TCP_LISTEN) {
        bpf_sk_release(sk);
        return NULL;
    }
    return sk;
}

// Assigns the packet to ztunnel's listener on `port` in this namespace, or drops it.
static __always_inline int to_listener(struct __sk_buff *skb, __be32 local, __u16 port, __u32 stat)
{
    struct bpf_sock_tuple t = {};
    t.ipv4.daddr = local;
    t.ipv4.dport = bpf_htons(port);
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (!sk) {
        count(STAT_NO_LISTENER);
        return TC_ACT_SHOT;
    }
    long err = sk->state == BPF_TCP_LISTEN ? bpf_sk_assign(skb, sk, 0) : -1;
    bpf_sk_release(sk);
    if (err) {
        count(STAT_NO_LISTENER);
        return TC_ACT_SHOT;
    }
    count(stat);
    return TC_ACT_OK;
}

SEC("classifier")
int trellis_egress(struct __sk_buff *skb)
{
    struct flow f = {};
    if (skb->protocol != bpf_htons(ETH_P_IP))
        return refuse_other(skb);
    if (skb->mark == PROXY_MARK)
        return TC_ACT_OK;
    int parsed = parse(skb, &f);
    if (parsed)
        return refuse_unparsed(parsed);
    if (!f.syn) {
        // Only flows ztunnel proxies: its 15001 socket has exactly this tuple, seen from its side.
        struct bpf_sock *sk = connection(skb, &f.tuple);
        if (!sk)
            return TC_ACT_OK;
        bpf_sk_release(sk);
    }
    // Turn the packet around: addressed to our own MAC, it is received as PACKET_HOST.
    __u8 mac[ETH_ALEN];
    if (bpf_skb_load_bytes(skb, ETH_ALEN, mac, ETH_ALEN) || bpf_skb_store_bytes(skb, 0, mac, ETH_ALEN, 0))
        return TC_ACT_SHOT;
    skb->mark = STEER_MARK;
    return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
}

SEC("classifier")
int trellis_ingress(struct __sk_buff *skb)
{
    struct flow f = {};
    if (skb->protocol != bpf_htons(ETH_P_IP))
        return refuse_other(skb);
    int parsed = parse(skb, &f);
    if (parsed)
        return refuse_unparsed(parsed);
    // Marks do not survive a namespace crossing, so only our own egress program sets this one.
    if (skb->mark == STEER_MARK) {
        struct bpf_sock *sk = connection(skb, &f.tuple);
        if (sk) {
            bpf_sk_assign(skb, sk, 0);
            bpf_sk_release(sk);
            return TC_ACT_OK;
        }
        if (!f.syn)
            return TC_ACT_OK; // no socket: delivered locally, the stack answers with a reset
        return to_listener(skb, f.tuple.ipv4.saddr, OUTBOUND_PORT, STAT_OUTBOUND);
    }
    if (!f.syn || f.tuple.ipv4.dport == bpf_htons(HBONE_PORT))
        return TC_ACT_OK;
    if (f.tuple.ipv4.saddr == PROBE_SOURCE) {
        count(STAT_PROBE);
        return TC_ACT_OK;
    }
    return to_listener(skb, f.tuple.ipv4.daddr, INBOUND_PLAINTEXT_PORT, STAT_INBOUND);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
