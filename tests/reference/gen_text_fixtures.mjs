// Reference outputs for minimind.c's tokenizer and chat-template tests.
//
// Rerun (Node 20; npm packages pinned in package.json):
//     cd tests/reference && npm install && node gen_text_fixtures.mjs
//
// Token ids come from Hugging Face's own tokenizers library (the npm package `tokenizers` is
// the Rust library with Node bindings; the pure-JS ports disagree with it on U+0085 / U+FEFF),
// chat prompts from @huggingface/jinja rendering each tokenizer's chat_template. Tokenizers:
// the project's own (tests/fixtures/tokenizer), the demo model's (demo/tokenizer, trained by
// demo/train.py; it has no chat template) and, when ../shared/minimind exists beside the
// repository, MiniMind's two real ones (read there, never copied). Writes
// tests/fixtures/text_expected.json; the tests need no Node.
import fs from "fs";
import path from "path";
import { fileURLToPath } from "url";
import { Tokenizer } from "tokenizers";
import { Template } from "@huggingface/jinja";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "..", "..");
const corpus = JSON.parse(fs.readFileSync(path.join(here, "corpus.json"), "utf8"));
const chats = JSON.parse(fs.readFileSync(path.join(here, "chats.json"), "utf8"));
const sources = {
  fixture: path.join(root, "tests", "fixtures", "tokenizer"),
  demo: path.join(root, "demo", "tokenizer"),
  minimind2: path.join(root, "..", "shared", "minimind", "minimind2"),
  "minimind-3": path.join(root, "..", "shared", "minimind", "minimind-3"),
};
const version = (p) => JSON.parse(fs.readFileSync(path.join(here, "node_modules", p, "package.json"), "utf8")).version;

const out = { generator: "tests/reference/gen_text_fixtures.mjs", tokenizers_version: version("tokenizers"),
              jinja_version: version("@huggingface/jinja"), tokenizers: {} };
for (const [name, dir] of Object.entries(sources)) {
  if (!fs.existsSync(path.join(dir, "tokenizer.json"))) { console.log(`skip ${name}: ${dir} is absent`); continue; }
  const tok = Tokenizer.fromFile(path.join(dir, "tokenizer.json"));
  const cfg = JSON.parse(fs.readFileSync(path.join(dir, "tokenizer_config.json"), "utf8"));
  const encode = async (text) => Array.from((await tok.encode(text, null, { addSpecialTokens: false })).getIds());
  const entry = { path: path.relative(root, dir), encode: [], chat: [] };
  let roundTripFailures = 0;
  for (const text of corpus) {
    const ids = await encode(text);
    if ((await tok.decode(ids, false)) !== text) roundTripFailures++;
    entry.encode.push(ids);
  }
  // the demo tokenizer: also the held-out sample that demo/train.py encoded with its own encoder
  if (name === "demo")
    entry.heldout_ids = await encode(JSON.parse(fs.readFileSync(path.join(root, "demo", "reference.json"), "utf8")).tokenize_text);
  const template = cfg.chat_template ? new Template(cfg.chat_template) : null;
  for (const c of template ? chats : []) {
    const vars = { messages: c.messages, add_generation_prompt: c.add_generation_prompt,
                   bos_token: cfg.bos_token, eos_token: cfg.eos_token };
    if ("open_thinking" in c) vars.open_thinking = c.open_thinking;
    if ("tools" in c) vars.tools = c.tools;
    // A template without tools renders a conversation with tools, tool calls or tool results as if
    // they were not there, and Jinja fails on what a template cannot print (a null content): run
    // refuses both, so the expectation is a refusal
    const toolUse = (c.tools || []).length > 0 ||
      c.messages.some((m) => m.role === "tool" || (m.tool_calls || []).length > 0);
    let text;
    try {
      if (toolUse && !cfg.chat_template.includes("<tool_call>")) throw new Error("the template has no tools");
      text = template.render(vars);
    } catch (e) {
      entry.chat.push({ name: c.name, error: e.message });
      continue;
    }
    entry.chat.push({ name: c.name, text, ids: await encode(text) });
  }
  out.tokenizers[name] = entry;
  console.log(`${name}: ${corpus.length} texts, ${chats.length} chats, ${roundTripFailures} decode round-trip failures`);
}
// one line per id list keeps the file small and diffable
const json = JSON.stringify(out, null, 1).replace(/\[\n\s*([\d,\n\s]*?)\n\s*\]/g, (m, ids) => "[" + ids.replace(/\s+/g, "") + "]");
fs.writeFileSync(path.join(root, "tests", "fixtures", "text_expected.json"), json + "\n");
