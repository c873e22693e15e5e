#!/usr/bin/env python3
"""Where the time goes, from a `perf record --call-graph=dwarf` profile of
the sidecar pair (PAIR_BENCH_PERF=FILE cargo bench --bench pair).

Usage: perf script -i FILE -F pid,tid,ip,sym,dso | python3 perf_groups.py CLIENT_PID

Prints two Markdown tables, in percent of all samples of both sidecars:
- self time by group: each sample goes to the group of the function it was
  in (kernel samples by the system call they are under);
- time including callees of chosen functions (a sample counts for every
  one of them on its stack).
"""
import re
import sys
from collections import Counter

# Self-time groups for user-space leaves, first match wins (the leaf frame
# is tried first, then its callers up to the first frame that matches).
USER_GROUPS = [
    ("crypto (ring: AES-GCM, GHASH)", r"^ring::|ring_core_|aes_|gcm_|ghash"),
    ("allocator (glibc malloc/free)", r"^(__libc_|_int_|__GI___libc_)?(malloc|free|cfree|realloc|calloc)|^_int_|unlink_chunk|malloc_consolidate|tcache"),
    ("memcpy / memmove", r"mem(move|cpy|set)"),
    ("rustls (records, buffers)", r"rustls::|tokio_rustls::"),
    ("authorization (portcullis::authz)", r"portcullis::authz::"),
    ("metrics (prometheus, peer labels)", r"prometheus::|portcullis::metrics::|Policy::record"),
    ("HTTP parsing and headers (hyper, http, httparse)", r"^(<)?(hyper|http|httparse)::|<hyper::|<http::"),
    ("HTTP client pool to the app (hyper_util)", r"hyper_util::client"),
    ("header checks and rewrites (portcullis::proxy::http)", r"portcullis::proxy::http::"),
    ("tokio (scheduler, timers, I/O readiness)", r"tokio::|mio::"),
    ("libc (syscall wrappers, clock)", r"^__GI_|^__libc_|clock_gettime|^epoll_wait|^__vdso"),
]

# Kernel samples: the system call they are under.
KERNEL_GROUPS = [
    ("kernel: sending (writev/sendto, with loopback delivery to the reader)", r"sys_sendto|do_writev|sys_writev"),
    ("kernel: receiving (recvfrom/read)", r"sys_recvfrom|ksys_read|sys_read"),
    ("kernel: epoll_wait, futex, scheduling", r"epoll_wait|futex|schedule"),
]

# Inclusive time of these (label, pattern matched against any frame; a
# tuple of patterns: each must match some frame of the sample).
INCLUSIVE = [
    ("server sidecar: HTTP request handler (`proxy::http::handle`)", r"portcullis::proxy::http::handle::"),
    ("…of it: admission (`admit`: header checks, path normalization, authorization)", r"portcullis::proxy::http::admit$"),
    ("…of it: `authz::eval::authorize`", r"portcullis::authz::eval::authorize"),
    ("…of it: metrics (`with_label_values`, `observe`, peer labels, decision counters)", (r"portcullis::proxy::http::handle::", r"prometheus::|portcullis::metrics::|Policy::record")),
    ("…of it: request to the app (hyper client and pool)", r"hyper_util::client::legacy::client::Client<C,B>::send_request"),
    ("metrics anywhere (also the byte counters of the copy loops)", r"prometheus::|portcullis::metrics::|Policy::record"),
    ("HTTP/1 parsing (hyper `parse`, both directions)", r"Http1Transaction>::parse"),
    ("TLS record encryption and decryption (rustls + ring)", r"MessageEncrypter>::encrypt|MessageDecrypter>::decrypt"),
    ("send system calls (writev, sendto)", r"__GI___writev|__libc_send|__send$|writev$"),
    ("receive system calls (recvfrom, read)", r"__libc_recv|__GI___libc_read|recvfrom$"),
    ("epoll_wait (idle workers waiting for work)", r"epoll_wait"),
]


def samples(lines):
    """Yields (pid, [frame symbols, leaf first]) per sample."""
    pid, frames = None, []
    for line in lines:
        if not line.strip():
            if pid is not None:
                yield pid, frames
            pid, frames = None, []
            continue
        if not line[0].isspace():
            pid = line.split()[0]
            continue
        m = re.match(r"\s*[0-9a-f]+ (.*?) \((.*)\)\s*$", line)
        if m:
            frames.append((m[1], m[2]))
    if pid is not None:
        yield pid, frames


def self_group(frames):
    sym, dso = frames[0] if frames else ("", "")
    if "kernel" in dso:
        for name, pat in KERNEL_GROUPS:
            if any(re.search(pat, s) for s, _ in frames):
                return name
        return "kernel: other (interrupts, timers)"
    for s, _ in frames:
        for name, pat in USER_GROUPS:
            if re.search(pat, s):
                return name
        if s.startswith("portcullis::") or "portcullis::" in s:
            return "portcullis (proxy loops, other)"
    return "other (core, alloc, std, async glue)"


def main():
    client = sys.argv[1] if len(sys.argv) > 1 else None
    total, by_pid = 0, Counter()
    groups, incl = Counter(), Counter()
    for pid, frames in samples(sys.stdin):
        total += 1
        by_pid["client" if pid == client else "server"] += 1
        groups[self_group(frames)] += 1
        for name, pats in INCLUSIVE:
            pats = pats if isinstance(pats, tuple) else (pats,)
            if all(any(re.search(p, s) for s, _ in frames) for p in pats):
                incl[name] += 1
    pct = lambda n: 100.0 * n / max(total, 1)
    print(f"{total} samples; " + ", ".join(f"{k} sidecar {pct(v):.0f}%" for k, v in sorted(by_pid.items())))
    print("\n| self time in | % |\n| --- | ---: |")
    for name, n in groups.most_common():
        print(f"| {name} | {pct(n):.1f} |")
    print("\n| time including callees | % |\n| --- | ---: |")
    for name, _ in INCLUSIVE:
        print(f"| {name} | {pct(incl[name]):.1f} |")


if __name__ == "__main__":
    main()
