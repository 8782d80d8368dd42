module Moe.Tests.ChatTemplateTests

open System
open System.IO
open System.Text.Json
open Expecto
open Moe
open Moe.Tests.Support

let private modelsDir (data: string) = Path.GetFullPath(Path.Combine(data, "..", "models"))

let private ints (e: JsonElement) : int[] = e.EnumerateArray() |> Seq.map (fun x -> x.GetInt32()) |> Array.ofSeq

let private prop (name: string) (e: JsonElement) : JsonElement option =
    match e.TryGetProperty name with
    | true, v -> Some v
    | _ -> None

/// tests/data/chat-templates/reference.json: templates rendered by Jinja2 set up as transformers 4.45.1 sets it
/// up (reference.py there), with the text each must give.
let private reference : Lazy<JsonElement> =
    lazy
        (use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(repoRoot, "tests", "data", "chat-templates", "reference.json")))
         doc.RootElement.Clone())

let private referenceNow () = DateTime.Parse((reference.Force().GetProperty "now").GetString(), Globalization.CultureInfo.InvariantCulture)

/// A case's options: its messages, tools, generation prompt and variables, with the reference clock.
let private optionsOf (case: JsonElement) : ChatTemplate.Value list * ChatTemplate.Options =
    let list name = prop name case |> Option.bind (fun v -> if v.ValueKind = JsonValueKind.Array then Some [ for x in v.EnumerateArray() -> ChatTemplate.ofJson x ] else None)
    let variables =
        match prop "variables" case with
        | Some v -> [ for p in v.EnumerateObject() -> p.Name, ChatTemplate.ofJson p.Value ]
        | None -> []
    defaultArg (list "messages") [],
    { ChatTemplate.defaults with
        AddGenerationPrompt = (match prop "add_generation_prompt" case with Some v -> v.GetBoolean() | None -> false)
        Tools = list "tools"
        Variables = variables
        Now = Some(referenceNow ()) }

let private cases (withFolder: bool) : JsonElement list =
    [ for c in (reference.Force().GetProperty "cases").EnumerateArray() do
          if (prop "folder" c).IsSome = withFolder then c ]

let private renderText (template: string) (variables: (string * ChatTemplate.Value) list) : string =
    let t = ChatTemplate.parse "test" [] template
    ChatTemplate.renderMessages t [] { ChatTemplate.defaults with AddGenerationPrompt = false; Variables = variables }

let private sampleIds =
    [ for folder in [ "qwen2-tiny"; "llama3-tokenizer-tiny" ] ->
          testWithShared (sprintf "%s: the sample's chat-template ids equal transformers'" folder) (fun data ->
              let dir = Path.Combine(modelsDir data, folder)
              use doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "sample_outputs.json")))
              let sample = doc.RootElement.GetProperty("tokenizer_json").GetProperty("chat_template")
              let messages = [ for m in (sample.GetProperty "messages").EnumerateArray() -> (m.GetProperty "role").GetString(), (m.GetProperty "content").GetString() ]
              let options =
                  { ChatTemplate.defaults with
                      AddGenerationPrompt = (sample.GetProperty "add_generation_prompt").GetBoolean()
                      Variables = [ for v in Option.toList (prop "date_string" sample) -> "date_string", ChatTemplate.Str(v.GetString()) ] }
              let template = ChatTemplate.fromFolder dir
              use tokenizer = HfTokenizer.fromFolder dir
              let ids = ChatTemplate.applyChatTemplate tokenizer template messages options
              Expect.sequenceEqual ids (ints (sample.GetProperty "ids")) "ids equal transformers' apply_chat_template") ]

let private sharedSamples =
    [ testWithShared "qwen2-tiny and llama3-tokenizer-tiny: every conversation renders as transformers renders it" (fun data ->
          let checkedCases = cases true
          Expect.isGreaterThanOrEqual checkedCases.Length 18 "the reference has the real templates' conversations"
          for case in checkedCases do
              let dir = Path.Combine(modelsDir data, (case.GetProperty "folder").GetString())
              let messages, options = optionsOf case
              let text = ChatTemplate.renderMessages (ChatTemplate.fromFolder dir) messages options
              Expect.equal text ((case.GetProperty "expected").GetString()) ((case.GetProperty "name").GetString()))

      testWithShared "Qwen2.5 adds its default system prompt; Llama-3.2 its date header; ids of a conversation" (fun data ->
          let qwenDir = Path.Combine(modelsDir data, "qwen2-tiny")
          let llamaDir = Path.Combine(modelsDir data, "llama3-tokenizer-tiny")
          let conversation = [ "user", "Hi"; "assistant", "Hello"; "user", "Summarize: it rained." ]
          let qwen = ChatTemplate.render (ChatTemplate.fromFolder qwenDir) conversation ChatTemplate.defaults
          Expect.equal qwen
              ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
               + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
               + "<|im_start|>user\nSummarize: it rained.<|im_end|>\n<|im_start|>assistant\n")
              "Qwen2.5 without a system message"
          let llamaOptions = { ChatTemplate.defaults with Now = Some(DateTime(2025, 3, 5)) }
          let llama = ChatTemplate.render (ChatTemplate.fromFolder llamaDir) conversation llamaOptions
          Expect.equal llama
              ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
               + "Today Date: 05 Mar 2025\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
               + "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
               + "<|start_header_id|>user<|end_header_id|>\n\nSummarize: it rained.<|eot_id|>"
               + "<|start_header_id|>assistant<|end_header_id|>\n\n")
              "Llama-3.2 without a system message: the date from strftime_now"
          use tokenizer = HfTokenizer.fromFolder llamaDir
          let ids = ChatTemplate.applyChatTemplate tokenizer (ChatTemplate.fromFolder llamaDir) conversation llamaOptions
          Expect.sequenceEqual ids (tokenizer.Encode(llama, false)) "ids are the rendered text without special tokens added again"
          Expect.equal ids.[0] 50256 "one <|begin_of_text|>, written by the template"
          Expect.notEqual ids.[1] 50256 "no second <|begin_of_text|>")

      testWithShared "Llama-3.2's raise_exception: two tool calls in one message fail with the template's message" (fun data ->
          let template = ChatTemplate.fromFolder (Path.Combine(modelsDir data, "llama3-tokenizer-tiny"))
          let call = ChatTemplate.Dict [ "function", ChatTemplate.Dict [ "name", ChatTemplate.Str "f"; "arguments", ChatTemplate.Dict [] ] ]
          let messages = [ ChatTemplate.message ("user", "x"); ChatTemplate.Dict [ "role", ChatTemplate.Str "assistant"; "tool_calls", ChatTemplate.List [ call; call ] ] ]
          throwsWith (fun () -> ChatTemplate.renderMessages template messages ChatTemplate.defaults |> ignore)
              [ "This model only supports single tool-calls at once!"; "tokenizer_config.json"; "line 72" ] "raise_exception") ]

let private interpreterTests =
    [ testCase "every construct, and templates in the style of other families, render as Jinja2 renders them with transformers' settings" (fun () ->
          let inline' = cases false
          Expect.isGreaterThanOrEqual inline'.Length 20 "the reference has the interpreter's cases"
          for case in inline' do
              let template = ChatTemplate.parse "test" [] ((case.GetProperty "template").GetString())
              let messages, options = optionsOf case
              let name = (case.GetProperty "name").GetString()
              match prop "error" case with
              | Some error ->
                  // The template's raise_exception: the same message, with where it came from.
                  throwsWith (fun () -> ChatTemplate.renderMessages template messages options |> ignore) [ error.GetString(); "chat template test, line 1" ] name
              | None -> Expect.equal (ChatTemplate.renderMessages template messages options) ((case.GetProperty "expected").GetString()) name)

      testCase "whitespace control: '-' strips all whitespace, statements trim their newline and indentation" (fun () ->
          Expect.equal (renderText "a \n {%- if true %}\n    b\n    {% endif %}\n  {{- 'c' }} \n" []) "a    b\nc " "trim_blocks, lstrip_blocks, '-' and the final newline dropped"
          Expect.equal (renderText "{{ 'x' }}\n{{ 'y' }}\n" []) "x\ny" "output tags keep the newline after them")

      testCase "namespace() keeps assignments made inside a loop; set alone does not" (fun () ->
          let t = "{% set ns = namespace(last='') %}{% set plain = '' %}{% for m in ['a', 'b'] %}{% set ns.last = m %}{% set plain = m %}{% endfor %}{{ ns.last }}/{{ plain }}/"
          Expect.equal (renderText t []) "b//" "namespace attribute vs loop-local set")

      testCase "messages[1:] and messages[0]: the system message split off" (fun () ->
          let t = ChatTemplate.parse "test" [] "{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}{{ system }}|{% for m in messages %}{{ m.role }}:{{ m['content'] | trim }};{% endfor %}"
          let text = ChatTemplate.render t [ "system", "S"; "user", " u "; "assistant", "a" ] ChatTemplate.defaults
          Expect.equal text "S|user:u;assistant:a;" "slicing and indexing")

      testCase "unsupported constructs fail with their name and line" (fun () ->
          let parseFails (template: string) (parts: string list) =
              throwsWith (fun () -> ChatTemplate.parse "t" [] template |> ignore) parts template
          parseFails "a\n{% macro m() %}x{% endmacro %}" [ "line 2"; "macro" ]
          parseFails "a\nb\n{% include 'other.jinja' %}" [ "line 3"; "include" ]
          parseFails "{% extends 'base' %}" [ "line 1"; "extends" ]
          parseFails "{% raw %}x{% endraw %}" [ "raw" ]
          parseFails "{% for x in xs recursive %}{% endfor %}" [ "recursive" ]
          parseFails "x\n{% if true %}never closed" [ "line 2"; "never closed"; "endif" ]
          parseFails "{{ 'a' $ 'b' }}" [ "line 1"; "'$'" ]
          let renderFails (template: string) (parts: string list) =
              throwsWith (fun () -> renderText template [] |> ignore) parts template
          renderFails "ok\n{{ 'x' | wordwrap(3) }}" [ "line 2"; "unsupported filter 'wordwrap'" ]
          renderFails "{{ 3 is prime }}" [ "unsupported test 'prime'" ]
          renderFails "\n\n{{ 'x'.format(1) }}" [ "line 3"; "'x'.format" ]
          renderFails "{{ undefined_thing.attr }}" [ "undefined_thing"; "undefined" ]
          renderFails "{{ 'a' + 1 }}" [ "cannot add a string and a integer" ]
          renderFails "{{ raise_exception('custom failure') }}" [ "custom failure" ])

      testCase "strftime_now reads the injected clock; date_string overrides it in Llama-style templates" (fun () ->
          let t = ChatTemplate.parse "test" [] "{% if not date_string is defined %}{% set date_string = strftime_now('%d %b %Y') %}{% endif %}{{ date_string }}"
          let at = { ChatTemplate.defaults with Now = Some(DateTime(2024, 12, 1, 23, 0, 0)) }
          Expect.equal (ChatTemplate.render t [] at) "01 Dec 2024" "from the clock"
          Expect.equal (ChatTemplate.render t [] { at with Variables = [ "date_string", ChatTemplate.Str "26 Jul 2024" ] }) "26 Jul 2024" "given")

      testCase "fromFolder: a list of named templates, chat_template.jinja, and a folder without one" (fun () ->
          let dir = Path.Combine(Path.GetTempPath(), sprintf "moe-chat-%d" (Random.Shared.Next()))
          Directory.CreateDirectory dir |> ignore
          try
              let config = """{"eos_token": "</s>", "chat_template": [{"name": "default", "template": "D{{ eos_token }}"}, {"name": "tool_use", "template": "T"}]}"""
              File.WriteAllText(Path.Combine(dir, "tokenizer_config.json"), config)
              Expect.equal (ChatTemplate.render (ChatTemplate.fromFolder dir) [] ChatTemplate.defaults) "D</s>" "the default, with the special tokens"
              Expect.equal (ChatTemplate.render (ChatTemplate.fromFolderNamed dir (Some "tool_use")) [] ChatTemplate.defaults) "T" "by name"
              throwsWith (fun () -> ChatTemplate.fromFolderNamed dir (Some "rag") |> ignore) [ "rag"; "default, tool_use" ] "an unknown name"
              File.WriteAllText(Path.Combine(dir, "tokenizer_config.json"), """{"eos_token": "</s>"}""")
              throwsWith (fun () -> ChatTemplate.fromFolder dir |> ignore) [ dir; "chat_template" ] "no template"
              File.WriteAllText(Path.Combine(dir, "chat_template.jinja"), "J{{ messages | length }}")
              Expect.equal (ChatTemplate.render (ChatTemplate.fromFolder dir) [ "user", "x" ] ChatTemplate.defaults) "J1" "chat_template.jinja"
          finally Directory.Delete(dir, true)) ]

let tests = testList "ChatTemplate" (sampleIds @ sharedSamples @ interpreterTests)
