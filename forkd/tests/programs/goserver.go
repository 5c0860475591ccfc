// A warm Go process (the runtime's threads, a pool of goroutines), for the
// multi-threaded restore tests (forkd/tests/threads.rs). Standard library
// only; GOMAXPROCS left at its default.
//
// It starts a pool of 8 worker goroutines fed over a channel, has them work
// once (so the runtime has started its threads), prints "ready", then
// answers each stdin line "N" with one line
//
//	n=N sumsq=S sha256=H
//
// where S is the sum of i*i for i in [0, N) (mod 2^64), computed in 16
// chunks by the pool and gathered over a channel, and H is the hex sha256
// of the line's text (without its newline), computed by a pool goroutine.
// It exits at end of input.
package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
)

// The main goroutine stays on the main thread, so the process waits for
// its input in read(2) on the main thread, as the tests expect.
func init() { runtime.LockOSThread() }

const workers = 8
const chunks = 16

type job struct {
	lo, hi uint64 // a chunk of the sum of squares
	text   string // or: the text to hash (when hash is set)
	hash   bool
	out    chan<- result
}

type result struct {
	sum  uint64
	hash string
}

func worker(jobs <-chan job) {
	for j := range jobs {
		if j.hash {
			h := sha256.Sum256([]byte(j.text))
			j.out <- result{hash: hex.EncodeToString(h[:])}
			continue
		}
		var s uint64
		for i := j.lo; i < j.hi; i++ {
			s += i * i
		}
		j.out <- result{sum: s}
	}
}

// answer dispatches one request to the pool.
func answer(jobs chan<- job, text string) (string, error) {
	n, err := strconv.ParseUint(strings.TrimSpace(text), 10, 64)
	if err != nil {
		return "", err
	}
	sums := make(chan result, chunks)
	step := n/chunks + 1
	sent := 0
	for lo := uint64(0); lo < n; lo += step {
		hi := lo + step
		if hi > n {
			hi = n
		}
		jobs <- job{lo: lo, hi: hi, out: sums}
		sent++
	}
	hashed := make(chan result, 1)
	jobs <- job{text: text, hash: true, out: hashed}
	var total uint64
	for i := 0; i < sent; i++ {
		total += (<-sums).sum
	}
	h := (<-hashed).hash
	return fmt.Sprintf("n=%d sumsq=%d sha256=%s", n, total, h), nil
}

func main() {
	jobs := make(chan job)
	for i := 0; i < workers; i++ {
		go worker(jobs)
	}
	// Warm up: the pool works (the runtime starts threads for it), a GC runs.
	if _, err := answer(jobs, "100000"); err != nil {
		panic(err)
	}
	runtime.GC()
	fmt.Println("ready")
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		line, err := answer(jobs, in.Text())
		if err != nil {
			fmt.Printf("error: %v\n", err)
			continue
		}
		// os.Stdout is unbuffered: each answer is written at once.
		fmt.Println(line)
	}
}
