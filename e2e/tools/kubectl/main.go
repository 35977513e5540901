// kubectl, built from the published k8s.io/kubectl module at the version the tests' control
// plane runs (what k8s.io/kubernetes/cmd/kubectl does, without building all of Kubernetes).
package main

import (
	"k8s.io/component-base/cli"
	"k8s.io/kubectl/pkg/cmd"
	"k8s.io/kubectl/pkg/cmd/util"
)

func main() {
	command := cmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		util.CheckErr(err)
	}
}
