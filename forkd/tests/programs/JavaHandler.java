// A Java function for the gateway (clients/java/remotefork/Runtime.java):
// answers {"n": N} with {"n", "fib" (a BigInteger, as a string), "sha"
// (first 16 hex of SHA-256 of the decimal N), "list" (the sum of N..0,
// sorted first)}. warmup() runs it 20,000 times, so it is JIT-compiled.
import java.math.BigInteger;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

public class JavaHandler {
    private static final Pattern N = Pattern.compile("\"n\"\\s*:\\s*(\\d+)");

    static BigInteger fib(int n) {
        BigInteger a = BigInteger.ZERO, b = BigInteger.ONE;
        for (int i = 0; i < n; i++) {
            BigInteger t = a.add(b);
            a = b;
            b = t;
        }
        return a;
    }

    static String sha16(String s) throws Exception {
        byte[] d = MessageDigest.getInstance("SHA-256").digest(s.getBytes(StandardCharsets.UTF_8));
        StringBuilder b = new StringBuilder();
        for (int i = 0; i < 8; i++) b.append(String.format("%02x", d[i]));
        return b.toString();
    }

    public static String handle(String event) throws Exception {
        Matcher m = N.matcher(event);
        if (!m.find()) throw new IllegalArgumentException("no n in " + event);
        int n = Integer.parseInt(m.group(1));
        List<Integer> list = new ArrayList<>();
        for (int i = n; i >= 0; i--) list.add(i);
        Collections.sort(list);
        long sum = 0;
        for (int v : list) sum += v;
        return "{\"n\": " + n + ", \"fib\": \"" + fib(n) + "\", \"sha\": \"" + sha16(Integer.toString(n)) + "\", \"list\": " + sum + "}";
    }

    public static void warmup() throws Exception {
        for (int i = 0; i < 20000; i++) handle("{\"n\": " + (i % 90) + "}");
    }
}
