// Command etcd is the etcd server of the pinned release, built from its Go module: the local
// cluster's store (scripts/local_cluster.sh starts it on loopback inside the cluster's namespace).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
