// The Java function runtime the gateway starts, captured from outside
// (the gateway's one-shot mode: a function registered with a ready line).
// A user writes a handler class with
//
//     public static String handle(String eventJson)    // JSON in, JSON out
//     public static void warmup()                       // optional
//
// and registers, for example,
//
//     java -XX:-UsePerfData -XX:+UseSerialGC -cp RUNTIME:HANDLER \
//          remotefork.Runtime com.example.Handler --ready-line ready
//
// with "ready_line": "ready". The runtime loads the class, runs warmup()
// (load classes, warm the JIT), prints the ready line, and waits in a read
// of stdin: forkd captures it there. Each child reads its one event line,
// prints {"ok": true, "result": <what handle returned>} (or {"ok": false,
// "error": ...}) as one line and exits.
//
// -XX:-UsePerfData keeps the JVM from mapping /tmp/hsperfdata_USER/PID
// shared (a file named after the parent's pid); the serial collector keeps
// its threads few. Objects of java.util.Random made before the capture give
// every child the same numbers (as after fork()); SecureRandom reads
// /dev/urandom, reopened in each child.
package remotefork;

import java.io.FileInputStream;
import java.io.FileDescriptor;
import java.io.IOException;
import java.io.PrintStream;
import java.lang.reflect.InvocationTargetException;
import java.lang.reflect.Method;
import java.nio.charset.StandardCharsets;

public final class Runtime {
    private Runtime() {}

    /** One line of stdin, read a byte at a time: nothing after it is taken. */
    static String readLine() throws IOException {
        FileInputStream in = new FileInputStream(FileDescriptor.in);
        java.io.ByteArrayOutputStream line = new java.io.ByteArrayOutputStream();
        int b;
        while ((b = in.read()) != -1 && b != '\n') {
            line.write(b);
        }
        return line.toString(StandardCharsets.UTF_8);
    }

    static String quote(String s) {
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            switch (c) {
                case '"': b.append("\\\""); break;
                case '\\': b.append("\\\\"); break;
                case '\n': b.append("\\n"); break;
                default:
                    if (c < 0x20) b.append(String.format("\\u%04x", (int) c));
                    else b.append(c);
            }
        }
        return b.append('"').toString();
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 3 || !args[1].equals("--ready-line")) {
            System.err.println("usage: java remotefork.Runtime HANDLER_CLASS --ready-line LINE");
            System.exit(2);
        }
        Class<?> cls = Class.forName(args[0]);
        Method handle = cls.getMethod("handle", String.class);
        try {
            cls.getMethod("warmup").invoke(null);
        } catch (NoSuchMethodException e) {
            // No warm-up: loading the class is all.
        }
        PrintStream out = new PrintStream(new java.io.FileOutputStream(FileDescriptor.out), true, StandardCharsets.UTF_8);
        out.println(args[2]);
        String event = readLine();
        String answer;
        int code = 0;
        try {
            answer = "{\"ok\": true, \"result\": " + handle.invoke(null, event) + "}";
        } catch (InvocationTargetException e) {
            Throwable t = e.getCause();
            answer = "{\"ok\": false, \"error\": " + quote(t.getClass().getSimpleName() + ": " + t.getMessage()) + "}";
            code = 1;
        }
        out.println(answer);
        out.flush();
        System.exit(code);
    }
}
