// Command pause is the local cluster's pod sandbox process (containerd's sandbox_image): it holds
// the pod's namespaces, reaps the zombies that end up with it as their parent, and exits on
// SIGTERM or SIGINT. The project builds it itself so that the cluster never pulls an image.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range signals {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
