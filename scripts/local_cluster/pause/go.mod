module mnist-distill.local/cluster/pause

go 1.26.0
