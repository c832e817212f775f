// A small CNI runtime on libcni, the library containerd, CRI-O and podman use.
//
// Usage: libcni_driver CONFLIST CACHE_DIR BIN_DIR[:BIN_DIR...]
//
// Reads one command per line on stdin and answers one JSON line per command:
//
//	add|check|del CONTAINER_ID NETNS IFNAME [ANNOTATION_KEY=VALUE]
//	-> {"ok": true, "ms": 1.23, "result": {...}} or {"ok": false, "ms": .., "error": ".."}
//
// "ms" is the wall time of the libcni call alone (config injection, plugin execs,
// result cache), so a benchmark measures what a runtime pays, without this process's
// start-up. CNI_ARGS carry the Kubernetes keys as CRI-O sends them, and the
// capability args carry the pod annotations (io.kubernetes.cri.pod-annotations),
// an empty portMappings list and no bandwidth limit.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
)

type answer struct {
	OK     bool            `json:"ok"`
	Ms     float64         `json:"ms"`
	Result json.RawMessage `json:"result,omitempty"`
	Error  string          `json:"error,omitempty"`
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
	in := bufio.NewScanner(os.Stdin)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		fields := strings.Fields(in.Text())
		if len(fields) < 4 {
			out.Encode(answer{Error: "want: add|check|del ID NETNS IFNAME [K=V]"})
			continue
		}
		annotations := map[string]string{}
		for _, kv := range fields[4:] {
			parts := strings.SplitN(kv, "=", 2)
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
		start := time.Now()
		var ans answer
		switch fields[0] {
		case "add":
			res, err := cni.AddNetworkList(context.Background(), list, rt)
			ans.Ms = float64(time.Since(start).Microseconds()) / 1000
			if err == nil {
				raw, merr := json.Marshal(res)
				ans.Result, err = raw, merr
			}
			ans.OK, ans.Error = err == nil, errText(err)
		case "check":
			err := cni.CheckNetworkList(context.Background(), list, rt)
			ans.Ms = float64(time.Since(start).Microseconds()) / 1000
			ans.OK, ans.Error = err == nil, errText(err)
		case "del":
			err := cni.DelNetworkList(context.Background(), list, rt)
			ans.Ms = float64(time.Since(start).Microseconds()) / 1000
			ans.OK, ans.Error = err == nil, errText(err)
		default:
			ans.Error = "unknown command " + fields[0]
		}
		out.Encode(ans)
	}
}

func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
