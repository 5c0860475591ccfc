# A Ruby process with worker threads, for the multi-threaded restore tests
# (forkd/tests/threads.rs).
#
# Two worker Threads ("rf-worker-0", "rf-worker-1"), each with its own
# request Queue, put answers on one shared Queue. Once both have answered a
# first, internal request, the main thread prints "ready"; then it gives
# stdin line k (from 0) to worker k % 2 and prints the answer as one JSON
# line:
#
#   {"n": N, "sumsq": sum of i*i for i in [0, N), "worker": its name,
#    "seq": how many requests that worker has answered (from 1),
#    "local": its thread-local value, "comm": its thread's name as the kernel
#    has it (/proc/thread-self/comm), "threads": Thread.list.size}
#
# and exits at end of input.
require 'json'

$stdout.sync = true

WORKERS = 2
requests = Array.new(WORKERS) { Queue.new }
answers = Queue.new

threads = (0...WORKERS).map do |w|
  Thread.new(w) do |me|
    Thread.current.name = "rf-worker-#{me}"
    Thread.current[:local] = "local-#{me}"
    seq = 0
    while (n = requests[me].pop)
      if n == :warm
        answers << :warm
        next
      end
      seq += 1
      sumsq = 0
      n.times { |i| sumsq += i * i }
      answers << { 'n' => n, 'sumsq' => sumsq, 'worker' => Thread.current.name, 'seq' => seq,
                   'local' => Thread.current[:local], 'comm' => File.read('/proc/thread-self/comm').strip,
                   'threads' => Thread.list.size }
    end
  end
end

WORKERS.times { |w| requests[w] << :warm }
WORKERS.times { answers.pop }
puts 'ready'

k = 0
$stdin.each_line do |line|
  requests[k % WORKERS] << Integer(line.strip, 10)
  k += 1
  puts JSON.generate(answers.pop)
end
requests.each { |q| q << nil }
threads.each(&:join)
