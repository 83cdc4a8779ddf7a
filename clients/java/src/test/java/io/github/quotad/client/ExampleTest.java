package io.github.quotad.client;

import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.ByteArrayOutputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import org.junit.jupiter.api.Test;

/** The README's example runs against the live quotad and prints the caller's limits. */
class ExampleTest {
  @Test
  void exampleReservesCommitsAndPrintsTheLimits() {
    Live.address();
    PrintStream original = System.out;
    ByteArrayOutputStream captured = new ByteArrayOutputStream();
    System.setOut(new PrintStream(captured, true, StandardCharsets.UTF_8));
    try {
      ReserveExample.main(new String[0]);
    } finally {
      System.setOut(original);
    }
    String output = captured.toString(StandardCharsets.UTF_8);
    System.out.print(output);
    assertTrue(output.matches("(?s).*\\bof \\d+ left\\n.*"), "the example printed no limits:\n" + output);
  }
}
