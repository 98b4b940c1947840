// Command cnitool is weft's small test driver for CNI plugins. It runs the
// ADD, CHECK or DEL of one named network configuration (a .conflist, or a
// single .conf upgraded to a list) against a network namespace, through
// libcni, exactly as a container runtime would.
//
// It is built from Debian's libcni sources (golang-github-appc-cni-dev,
// libcni 1.1.x) without modules:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o /tmp/cnitool .
//
// Usage: cnitool add|check|del <net-name> <netns-path>
//
// Environment:
//
//	CNI_PATH         plugin search path, ':'-separated (required)
//	NETCONFPATH      directory holding the network configs (default /etc/cni/net.d)
//	CNI_IFNAME       interface name inside the namespace (default eth0)
//	CNI_ARGS         extra plugin arguments "K=V;K2=V2"
//	CAP_ARGS         capability arguments as a JSON object, e.g. {"aliases":{"net":["web"]}}
//	CNI_CONTAINERID  container ID (default: derived from the netns path)
//	CNI_CACHEDIR     libcni result cache directory (default /var/lib/cni)
//
// libcni 1.1.x has no GCNetworkList or GetStatusNetworkList (they arrived in
// libcni 1.2), so there are no gc or status subcommands.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
)

const usage = `usage: cnitool add|check|del <net-name> <netns-path>

environment: CNI_PATH (required), NETCONFPATH (default /etc/cni/net.d),
CNI_IFNAME (default eth0), CNI_ARGS "K=V;K2=V2", CAP_ARGS (JSON object),
CNI_CONTAINERID (default derived from the netns path), CNI_CACHEDIR`

func main() {
	if err := run(os.Args[1:]); err != nil {
		var cniErr *types.Error
		if errors.As(err, &cniErr) {
			// The plugin's own error object: code, msg, details.
			fmt.Fprintf(os.Stderr, "cnitool: %v\n", err)
			fmt.Fprintf(os.Stderr, "cnitool: plugin error code=%d msg=%q", cniErr.Code, cniErr.Msg)
			if cniErr.Details != "" {
				fmt.Fprintf(os.Stderr, " details=%q", cniErr.Details)
			}
			fmt.Fprintln(os.Stderr)
		} else {
			fmt.Fprintf(os.Stderr, "cnitool: %v\n", err)
		}
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) != 3 {
		return fmt.Errorf("expected 3 arguments, got %d\n%s", len(args), usage)
	}
	cmd, netName, netnsArg := args[0], args[1], args[2]
	switch cmd {
	case "add", "check", "del":
	default:
		return fmt.Errorf("unknown command %q\n%s", cmd, usage)
	}

	confDir := envOr("NETCONFPATH", "/etc/cni/net.d")
	list, err := libcni.LoadConfList(confDir, netName)
	if err != nil {
		return fmt.Errorf("loading network %q from %s: %w", netName, confDir, err)
	}

	pluginPath := os.Getenv("CNI_PATH")
	if pluginPath == "" {
		return errors.New("CNI_PATH is not set")
	}
	netns, err := filepath.Abs(netnsArg)
	if err != nil {
		return fmt.Errorf("netns path %q: %w", netnsArg, err)
	}

	pluginArgs, err := parseArgs(os.Getenv("CNI_ARGS"))
	if err != nil {
		return err
	}
	capArgs := map[string]interface{}{}
	if s := strings.TrimSpace(os.Getenv("CAP_ARGS")); s != "" {
		if err := json.Unmarshal([]byte(s), &capArgs); err != nil {
			return fmt.Errorf("CAP_ARGS is not a JSON object: %w", err)
		}
	}

	containerID := os.Getenv("CNI_CONTAINERID")
	if containerID == "" {
		// Stable per namespace, so a later check/del finds the cached ADD result.
		sum := sha256.Sum256([]byte(netns))
		containerID = "cnitool-" + hex.EncodeToString(sum[:10])
	}

	rt := &libcni.RuntimeConf{
		ContainerID:    containerID,
		NetNS:          netns,
		IfName:         envOr("CNI_IFNAME", "eth0"),
		Args:           pluginArgs,
		CapabilityArgs: capArgs,
	}
	cni := libcni.NewCNIConfigWithCacheDir(filepath.SplitList(pluginPath), os.Getenv("CNI_CACHEDIR"), nil)
	ctx := context.Background()

	switch cmd {
	case "add":
		result, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			return err
		}
		if err := result.PrintTo(os.Stdout); err != nil {
			return err
		}
		_, err = fmt.Println()
		return err
	case "check":
		return cni.CheckNetworkList(ctx, list, rt)
	default:
		return cni.DelNetworkList(ctx, list, rt)
	}
}

// parseArgs turns "K=V;K2=V2" into libcni's argument pairs.
func parseArgs(s string) ([][2]string, error) {
	var out [][2]string
	for _, kv := range strings.Split(s, ";") {
		if kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("CNI_ARGS: %q is not KEY=VALUE", kv)
		}
		out = append(out, [2]string{k, v})
	}
	return out, nil
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}
