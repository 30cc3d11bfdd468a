// govmm_lifecycle drives chapeau's QMP socket with Kata's own QMP library (govmm), the way
// Kata's QEMU driver does: connect, capabilities, query-status, query-cpus-fast, stop, cont,
// then `quit` or `system_powerdown`, and waits for the SHUTDOWN event and the disconnection.
// It prints one `key=value` line per step for tests/tests/qemu.rs; any failure exits 1.
//
// Built by the test: GO111MODULE=off GOPATH=/usr/share/gocode go build (Debian's
// golang-github-kata-containers-govmm-dev).
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/kata-containers/govmm/qemu"
)

func check(step string, err error) {
	if err != nil {
		fmt.Printf("error=%s: %v\n", step, err)
		os.Exit(1)
	}
}

func main() {
	if len(os.Args) != 3 || (os.Args[2] != "quit" && os.Args[2] != "powerdown") {
		fmt.Println("usage: govmm_lifecycle QMP_SOCKET quit|powerdown")
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	events := make(chan qemu.QMPEvent, 16)
	disconnected := make(chan struct{})
	q, version, err := qemu.QMPStart(ctx, os.Args[1], qemu.QMPConfig{EventCh: events}, disconnected)
	check("connect", err)
	fmt.Printf("version=%d.%d.%d\n", version.Major, version.Minor, version.Micro)
	check("qmp_capabilities", q.ExecuteQMPCapabilities(ctx))
	status, err := q.ExecuteQueryStatus(ctx)
	check("query-status", err)
	fmt.Printf("status=%s\n", status.Status)
	cpus, err := q.ExecQueryCpusFast(ctx)
	check("query-cpus-fast", err)
	for _, cpu := range cpus {
		fmt.Printf("cpu=%d thread=%d\n", cpu.CPUIndex, cpu.ThreadID)
	}
	check("stop", q.ExecuteStop(ctx))
	status, err = q.ExecuteQueryStatus(ctx)
	check("query-status", err)
	fmt.Printf("stopped=%s\n", status.Status)
	check("cont", q.ExecuteCont(ctx))
	status, err = q.ExecuteQueryStatus(ctx)
	check("query-status", err)
	fmt.Printf("continued=%s\n", status.Status)
	if os.Args[2] == "quit" {
		check("quit", q.ExecuteQuit(ctx))
	} else {
		// govmm waits for the POWERDOWN event itself.
		check("system_powerdown", q.ExecuteSystemPowerdown(ctx))
	}
	for {
		select {
		case event := <-events:
			fmt.Printf("event=%s\n", event.Name)
			if event.Name == "SHUTDOWN" {
				q.Shutdown()
				<-disconnected
				fmt.Println("done=yes")
				return
			}
		case <-disconnected:
			check("waiting for SHUTDOWN", fmt.Errorf("disconnected first"))
		case <-ctx.Done():
			check("waiting for SHUTDOWN", ctx.Err())
		}
	}
}
