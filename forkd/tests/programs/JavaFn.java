// A warm JVM (HotSpot's JIT, GC and runtime threads, the JCA providers),
// for the restore tests of runtimes that hold kernel objects. Standard
// library only. Run it either from source, `java JavaFn.java` (the source
// launcher compiles it in memory: needs the jdk.compiler module, which
// Debian's openjdk-17-jdk-headless ships; the -jre-headless package alone
// does not), or compiled, `javac -d DIR JavaFn.java && java -cp DIR JavaFn`.
// Recommended flags for a capturable JVM: -XX:-UsePerfData (no
// /tmp/hsperfdata_* shared mapping), -XX:+UseSerialGC, -XX:CICompilerCount=2,
// -XX:TieredStopAtLevel=1, -Xshare:auto (the default).
//
// It warms up (runs the handler 20000 times, so it is JIT-compiled),
// prints "ready", then answers each stdin line:
//
//   N    fib=<fib(N)> sha=<first 16 hex of SHA-256(line)> list=<sum of
//        the list N, N-1, ..., 0 after sorting it>
//   pid  pid=<this process's pid, read from /proc/self>
//
// (Not ProcessHandle.current().pid(): ProcessHandleImpl stores the pid
// once, when the class is first used, so a child restored from a parent
// that had used it would report its parent's pid.)
//
// one line per request, flushed, and exits 0 at end of input.
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.math.BigInteger;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;

public class JavaFn {
    static BigInteger fib(int n) {
        BigInteger a = BigInteger.ZERO, b = BigInteger.ONE;
        for (int i = 0; i < n; i++) {
            BigInteger t = a.add(b);
            a = b;
            b = t;
        }
        return a;
    }

    static String sha16(String text) throws Exception {
        byte[] d = MessageDigest.getInstance("SHA-256").digest(text.getBytes(StandardCharsets.UTF_8));
        StringBuilder sb = new StringBuilder();
        for (int i = 0; i < 8; i++) sb.append(String.format("%02x", d[i] & 0xff));
        return sb.toString();
    }

    static long listSum(int n) {
        List<Integer> list = new ArrayList<>();
        for (int i = n; i >= 0; i--) list.add(i);
        Collections.sort(list);
        long sum = 0;
        for (int v : list) sum += v;
        return sum;
    }

    static String answer(String line) throws Exception {
        if (line.equals("pid")) return "pid=" + Files.readSymbolicLink(Path.of("/proc/self"));
        int n;
        try {
            n = Integer.parseInt(line);
        } catch (NumberFormatException e) {
            return "error=bad request " + line;
        }
        if (n < 0) return "error=bad request " + line;
        return "fib=" + fib(n) + " sha=" + sha16(line) + " list=" + listSum(n);
    }

    public static void main(String[] args) throws Exception {
        // RF_NO_WARMUP set: a plain cold start (the benchmark's baseline).
        if (System.getenv("RF_NO_WARMUP") == null) {
            long check = 0;
            for (int i = 0; i < 20000; i++) check += answer(Integer.toString(i % 200)).length();
            if (check == 0) throw new IllegalStateException("warm-up computed nothing");
        }
        PrintStream out = new PrintStream(new java.io.FileOutputStream(java.io.FileDescriptor.out), false, "UTF-8");
        out.println("ready");
        out.flush();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String line;
        while ((line = in.readLine()) != null) {
            line = line.trim();
            if (line.isEmpty()) continue;
            out.println(answer(line));
            out.flush();
        }
        out.flush();
        System.exit(0);
    }
}
