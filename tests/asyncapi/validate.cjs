// Parses the AsyncAPI document on stdin with the official parser (@asyncapi/parser) and prints
// every diagnostic it reports as JSON: {"parsed": bool, "diagnostics": [...]}.
// Severity follows Spectral: 0 error, 1 warning, 2 information, 3 hint.
const fs = require("fs");
const { Parser } = require("@asyncapi/parser");

async function main() {
  const text = fs.readFileSync(0, "utf8");
  const { document, diagnostics } = await new Parser().parse(text);
  const found = diagnostics.map((d) => ({
    code: d.code,
    message: d.message,
    path: d.path.join("/"),
    severity: d.severity,
  }));
  process.stdout.write(JSON.stringify({ parsed: document !== undefined, diagnostics: found }));
}

main().catch((error) => {
  process.stderr.write(String(error && error.stack ? error.stack : error));
  process.exit(2);
});
