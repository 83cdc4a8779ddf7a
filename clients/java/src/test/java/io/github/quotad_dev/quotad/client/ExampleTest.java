package io.github.quotad_dev.quotad.client;

import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.ByteArrayOutputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.util.regex.Pattern;
import org.junit.jupiter.api.Test;

/**
 * The README's example runs against the live quotad and prints the caller's limits; run again at
 * once, it does the same (each run is a new user, so it is never denied by the last one).
 */
class ExampleTest {
  /**
   * The per-user token limit after the example's commit of 300 + 97 tokens: tokens-per-day in
   * tests/conformance/policy.yaml, tokens-per-minute in the example policy that `make run` serves.
   * The latter refills one token every 60 ms between the reserve and the usage read, which a loaded
   * machine shows: 603 up to 649 (3 s). A commit of the estimate instead would show 500.
   */
  private static final Pattern COMMITTED =
      Pattern.compile("(?m)^tokens-per-(day|minute): (60[3-9]|6[1-4][0-9]) of 1000 left$");

  @Test
  void exampleReservesCommitsAndPrintsTheLimits() {
    Live.address();
    for (int run = 1; run <= 2; run++) {
      String output = runExample();
      System.out.print(output);
      assertTrue(
          COMMITTED.matcher(output).find(), "run " + run + " did not commit 397 tokens:\n" + output);
    }
  }

  private static String runExample() {
    PrintStream out = System.out;
    PrintStream err = System.err;
    ByteArrayOutputStream captured = new ByteArrayOutputStream();
    PrintStream capture = new PrintStream(captured, true, StandardCharsets.UTF_8);
    System.setOut(capture);
    System.setErr(capture);
    try {
      ReserveExample.main(new String[0]);
    } finally {
      System.setOut(out);
      System.setErr(err);
    }
    return captured.toString(StandardCharsets.UTF_8);
  }
}
