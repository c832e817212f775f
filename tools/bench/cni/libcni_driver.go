// A small CNI runtime on libcni, the library containerd, CRI-O and podman use.
//
// Usage: libcni_driver CONFLIST CACHE_DIR BIN_DIR[:BIN_DIR...]
//
// Reads one command per line on stdin and answers one JSON line per command:
//
//	add|check|del CONTAINER_ID NETNS IFNAME [ANNOTATION_KEY=VALUE...] [+HOST_LINK...]
//	-> {"ok": true, "ms": 1.23, "cpu_us": 900, "result": {...}}
//	   or {"ok": false, "ms": .., "cpu_us": .., "error": ".."}
//	gone
//	-> {"ok": true, "gone_ms": {"HOST_LINK": 20.1, ...}, "overflows": 0}
//
// "ms" is the wall time of the libcni call alone (config injection, plugin execs,
// result cache), so a benchmark measures what a runtime pays, without this process's
// start-up. "cpu_us" is the CPU (user + system) of the processes the call exec'd (the
// plugins and whatever they exec'd), from getrusage(RUSAGE_CHILDREN).
//
// A "+HOST_LINK" on a del names a link of this namespace the DEL should remove (the host
// end of the pod's veth). The driver subscribes to RTM_DELLINK (once, before the first
// such del, so no deletion is missed), and "gone" waits until every named link's
// RTM_DELLINK has arrived, answering for each the time from the start of its DEL to the
// event: the DEL with the link's removal inside the clock, whether the plugin deleted it
// before answering or after. The del itself answers as soon as libcni returns, so DELs
// issued back to back overlap any deferred deletion, as a runtime's would. If the kernel
// drops events (ENOBUFS), the named links still present are looked up once, and those
// gone are timed at that moment (an upper bound) and counted in "overflows".
//
// CNI_ARGS carry the Kubernetes keys as CRI-O sends them, and the capability args carry
// the pod annotations (io.kubernetes.cri.pod-annotations), an empty portMappings list
// and no bandwidth limit.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containernetworking/cni/libcni"
)

const (
	goneTimeout = 30 * time.Second
	rtmgrpLink  = 0x1 // RTMGRP_LINK, <linux/rtnetlink.h>; not in package syscall
)

type answer struct {
	OK        bool               `json:"ok"`
	Ms        float64            `json:"ms"`
	CPUUs     int64              `json:"cpu_us"`
	Result    json.RawMessage    `json:"result,omitempty"`
	Error     string             `json:"error,omitempty"`
	GoneMs    map[string]float64 `json:"gone_ms,omitempty"`
	Overflows int                `json:"overflows,omitempty"`
}

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: libcni_driver CONFLIST CACHE_DIR BIN_DIRS")
		os.Exit(2)
	}
	list, err := libcni.ConfListFromFile(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	cni := libcni.NewCNIConfigWithCacheDir(strings.Split(os.Args[3], ":"), os.Args[2], nil)
	watch := newLinkWatch()
	in := bufio.NewScanner(os.Stdin)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		fields := strings.Fields(in.Text())
		if len(fields) == 1 && fields[0] == "gone" {
			out.Encode(watch.wait(goneTimeout))
			continue
		}
		if len(fields) < 4 {
			out.Encode(answer{Error: "want: add|check|del ID NETNS IFNAME [K=V...] [+LINK...] | gone"})
			continue
		}
		annotations := map[string]string{}
		var links []string
		for _, arg := range fields[4:] {
			if strings.HasPrefix(arg, "+") {
				links = append(links, arg[1:])
				continue
			}
			parts := strings.SplitN(arg, "=", 2)
			if len(parts) == 2 {
				annotations[parts[0]] = parts[1]
			}
		}
		rt := &libcni.RuntimeConf{
			ContainerID: fields[1],
			NetNS:       fields[2],
			IfName:      fields[3],
			Args: [][2]string{
				{"IgnoreUnknown", "1"},
				{"K8S_POD_NAMESPACE", "default"},
				{"K8S_POD_NAME", "pod-" + fields[1]},
				{"K8S_POD_INFRA_CONTAINER_ID", fields[1]},
				{"K8S_POD_UID", "uid-" + fields[1]},
			},
			CapabilityArgs: map[string]interface{}{
				"io.kubernetes.cri.pod-annotations": annotations,
				"portMappings":                      []interface{}{},
			},
		}
		if len(links) > 0 && fields[0] == "del" {
			// Outside the clock: subscribing, and checking the links exist to be removed.
			if err := watch.expect(links); err != nil {
				out.Encode(answer{Error: err.Error()})
				continue
			}
		}
		cpu := childrenCPU()
		start := time.Now()
		var ans answer
		switch fields[0] {
		case "add":
			res, err := cni.AddNetworkList(context.Background(), list, rt)
			ans.Ms = msSince(start)
			if err == nil {
				raw, merr := json.Marshal(res)
				ans.Result, err = raw, merr
			}
			ans.OK, ans.Error = err == nil, errText(err)
		case "check":
			err := cni.CheckNetworkList(context.Background(), list, rt)
			ans.Ms = msSince(start)
			ans.OK, ans.Error = err == nil, errText(err)
		case "del":
			watch.started(links, start)
			err := cni.DelNetworkList(context.Background(), list, rt)
			ans.Ms = msSince(start)
			ans.OK, ans.Error = err == nil, errText(err)
		default:
			ans.Error = "unknown command " + fields[0]
		}
		ans.CPUUs = (childrenCPU() - cpu).Microseconds()
		out.Encode(ans)
	}
}

func msSince(start time.Time) float64 {
	return float64(time.Since(start).Microseconds()) / 1000
}

// childrenCPU is the user + system time of every child waited for so far.
func childrenCPU() time.Duration {
	var usage syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_CHILDREN, &usage); err != nil {
		panic(err)
	}
	return time.Duration(usage.Utime.Nano() + usage.Stime.Nano())
}

// linkWatch times links' removal from RTM_DELLINK events of this namespace.
type linkWatch struct {
	mu        sync.Mutex
	changed   *sync.Cond
	fd        int
	pending   map[string]time.Time // link -> the start of the DEL that should remove it
	gone      map[string]time.Duration
	overflows int
	failed    error
}

func newLinkWatch() *linkWatch {
	w := &linkWatch{fd: -1, pending: map[string]time.Time{}, gone: map[string]time.Duration{}}
	w.changed = sync.NewCond(&w.mu)
	return w
}

func (w *linkWatch) expect(links []string) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.fd < 0 {
		if err := w.subscribe(); err != nil {
			return err
		}
	}
	for _, name := range links {
		if _, err := net.InterfaceByName(name); err != nil {
			return fmt.Errorf("host link %s not present before its DEL: %v", name, err)
		}
		if _, dup := w.pending[name]; dup {
			return fmt.Errorf("host link %s already awaited", name)
		}
	}
	return nil
}

func (w *linkWatch) started(links []string, at time.Time) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, name := range links {
		w.pending[name] = at
	}
}

func (w *linkWatch) subscribe() error {
	fd, err := syscall.Socket(syscall.AF_NETLINK, syscall.SOCK_RAW|syscall.SOCK_CLOEXEC, syscall.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("netlink socket: %v", err)
	}
	// A burst of ADDs sends several events per veth; room for thousands (root may force it).
	if syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_RCVBUFFORCE, 8<<20) != nil {
		syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_RCVBUF, 8<<20)
	}
	if err := syscall.Bind(fd, &syscall.SockaddrNetlink{Family: syscall.AF_NETLINK, Groups: rtmgrpLink}); err != nil {
		syscall.Close(fd)
		return fmt.Errorf("netlink bind RTMGRP_LINK: %v", err)
	}
	w.fd = fd
	go w.read()
	return nil
}

func (w *linkWatch) read() {
	buf := make([]byte, 1<<16)
	for {
		n, _, err := syscall.Recvfrom(w.fd, buf, 0)
		now := time.Now()
		if err == syscall.EINTR {
			continue
		}
		if err == syscall.ENOBUFS {
			w.recover(now)
			continue
		}
		if err != nil {
			w.fail(fmt.Errorf("netlink receive: %v", err))
			return
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			w.fail(fmt.Errorf("netlink parse: %v", err))
			return
		}
		for i := range msgs {
			if msgs[i].Header.Type != syscall.RTM_DELLINK {
				continue
			}
			attrs, err := syscall.ParseNetlinkRouteAttr(&msgs[i])
			if err != nil {
				continue
			}
			for _, attr := range attrs {
				if attr.Attr.Type == syscall.IFLA_IFNAME {
					w.removed(strings.TrimRight(string(attr.Value), "\x00"), now)
				}
			}
		}
	}
}

func (w *linkWatch) removed(name string, at time.Time) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if start, ok := w.pending[name]; ok {
		delete(w.pending, name)
		w.gone[name] = at.Sub(start)
		w.changed.Broadcast()
	}
}

// recover: events were dropped; time the awaited links already gone at this moment.
func (w *linkWatch) recover(at time.Time) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.overflows++
	for name, start := range w.pending {
		if _, err := net.InterfaceByName(name); err != nil {
			delete(w.pending, name)
			w.gone[name] = at.Sub(start)
		}
	}
	w.changed.Broadcast()
}

func (w *linkWatch) fail(err error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.failed = err
	w.changed.Broadcast()
}

// wait until every awaited link is gone (or timeout), then answer and forget them.
func (w *linkWatch) wait(timeout time.Duration) answer {
	timer := time.AfterFunc(timeout, func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		w.changed.Broadcast()
	})
	defer timer.Stop()
	deadline := time.Now().Add(timeout)
	w.mu.Lock()
	defer w.mu.Unlock()
	for len(w.pending) > 0 && w.failed == nil && time.Now().Before(deadline) {
		w.changed.Wait()
	}
	ans := answer{GoneMs: map[string]float64{}, Overflows: w.overflows}
	for name, took := range w.gone {
		ans.GoneMs[name] = float64(took.Microseconds()) / 1000
	}
	switch {
	case w.failed != nil:
		ans.Error = w.failed.Error()
	case len(w.pending) > 0:
		var left []string
		for name := range w.pending {
			left = append(left, name)
		}
		sort.Strings(left)
		ans.Error = fmt.Sprintf("links still present %v after their DEL: %s", timeout, strings.Join(left, " "))
	default:
		ans.OK = true
	}
	w.pending, w.gone, w.overflows = map[string]time.Time{}, map[string]time.Duration{}, 0
	return ans
}

func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
