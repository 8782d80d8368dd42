/// BERT's WordPiece tokenizer (Wu et al. 2016; Devlin et al. 2019) from a checkpoint folder's `vocab.txt`, run
/// through the same Hugging Face `tokenizers` library as every other folder (`Moe.HfTokenizer`): the
/// `tokenizer.json` that transformers 4.45.1's `BertConverter` (convert_slow_tokenizer.py) writes for a slow
/// `BertTokenizer` is built here and loaded, so BERT folders without a tokenizer.json tokenize as
/// `AutoTokenizer` does (BertNormalizer: clean text, Chinese characters split, lowercasing and accent
/// stripping as tokenizer_config.json says; BertPreTokenizer; WordPiece with "##" and max 100 characters a
/// word; `[CLS] A [SEP]` and `[CLS] A [SEP] B [SEP]`).
module Moe.WordPiece

open System
open System.Collections.Generic
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open Moe.HfTokenizer

/// BertTokenizer's special tokens (its __init__ defaults).
let bertSpecials =
    [ "unk_token", "[UNK]"; "sep_token", "[SEP]"; "pad_token", "[PAD]"; "cls_token", "[CLS]"; "mask_token", "[MASK]" ]

/// The settings of BertTokenizer that change its normalizer: `do_lower_case` (default true),
/// `tokenize_chinese_chars` (true) and `strip_accents` (None: follow lowercasing).
type BasicTokenizerSettings = { LowerCase: bool; ChineseChars: bool; StripAccents: bool option }

/// Reads `do_lower_case`, `tokenize_chinese_chars` and `strip_accents` from tokenizer_config.json (absent file
/// or fields: BertTokenizer's defaults); a field of the wrong type is refused naming the file.
let readBasicSettings (dir: string) : BasicTokenizerSettings =
    let file = Path.Combine(dir, "tokenizer_config.json")
    let defaults = { LowerCase = true; ChineseChars = true; StripAccents = None }
    if not (File.Exists file) then defaults
    else
        use doc = JsonDocument.Parse(File.ReadAllText file)
        let flag (name: string) : bool option =
            match doc.RootElement.TryGetProperty name with
            | true, v when v.ValueKind = JsonValueKind.True -> Some true
            | true, v when v.ValueKind = JsonValueKind.False -> Some false
            | true, v when v.ValueKind = JsonValueKind.Null -> None
            | true, v -> failwithf "%s: field \"%s\": expected true, false or null, got %s" file name (v.GetRawText())
            | _ -> None
        { LowerCase = flag "do_lower_case" |> Option.defaultValue true
          ChineseChars = flag "tokenize_chinese_chars" |> Option.defaultValue true
          StripAccents = flag "strip_accents" }

/// vocab.txt: one token a line, its id the line's index (transformers' `load_vocab`; a repeated token keeps
/// its last line's id, as that dict does). Fails on an empty file.
let readVocab (file: string) : (string * int) list =
    let lines = File.ReadAllLines file
    if lines.Length = 0 then failwithf "%s: empty vocabulary (expected one WordPiece token a line)" file
    let ids = Dictionary<string, int>(StringComparer.Ordinal)
    lines |> Array.iteri (fun i line -> ids[line.TrimEnd('\n', '\r')] <- i)
    [ for KeyValue(t, id) in ids -> t, id ] |> List.sortBy snd

let private jstr (s: string) : JsonNode = JsonValue.Create s
let private jbool (b: bool) : JsonNode = JsonValue.Create b
let private jint (i: int) : JsonNode = JsonValue.Create i
let private obj (fields: (string * JsonNode) list) : JsonObject = JsonObject(fields |> List.map KeyValuePair)

/// The settings with BertTokenizer's default special tokens for the roles the folder leaves unnamed.
let withBertDefaults (s: Settings) : Settings =
    let specials =
        bertSpecials |> List.fold (fun (m: Map<string, string>) (role, token) ->
            if m.ContainsKey role || s.NullRoles.Contains role then m else m.Add(role, token)) s.Specials
    { s with Specials = specials }

/// vocab.txt -> the tokenizer.json of BertConverter. Special tokens are added tokens at their vocabulary ids
/// (normalized false, special true, as transformers registers them); a special token missing from the
/// vocabulary is refused (the model has no embedding for it).
let wordPieceDocument (vocabFile: string) (s: Settings) (basic: BasicTokenizerSettings) : JsonObject =
    let vocab = readVocab vocabFile
    let ids = Dictionary<string, int>(StringComparer.Ordinal)
    for t, id in vocab do ids[t] <- id
    let idOf (role: string) (token: string) =
        match ids.TryGetValue token with
        | true, id -> id
        | _ -> failwithf "%s: the %s %s is not in the vocabulary" vocabFile role token
    let special (role: string) =
        match s.Specials.TryFind role with
        | Some t -> t, idOf role t
        | None -> failwithf "%s: the tokenizer needs a %s" (Path.GetDirectoryName vocabFile) role
    let added =
        [ for KeyValue(role, token) in s.Specials -> idOf role token, token ]
        @ [ for t in s.AddedTokensDecoder -> t.Id, t.Content ]
        |> List.distinctBy snd
        |> List.sortBy fst
    let addedNode (id: int, content: string) : JsonNode =
        obj [ "id", jint id; "content", jstr content; "single_word", jbool false; "lstrip", jbool false
              "rstrip", jbool false; "normalized", jbool false; "special", jbool true ]
    let cls, clsId = special "cls_token"
    let sep, sepId = special "sep_token"
    let unk, _ = special "unk_token"
    let piece (p: string) (typeId: int) : JsonNode =
        match p with
        | "$A" | "$B" -> obj [ "Sequence", obj [ "id", jstr (p.Substring 1); "type_id", jint typeId ] ]
        | t -> obj [ "SpecialToken", obj [ "id", jstr t; "type_id", jint typeId ] ]
    let specialNode (t: string) (id: int) : JsonNode = obj [ "id", jstr t; "ids", JsonArray(jint id); "tokens", JsonArray(jstr t) ]
    obj [ "version", jstr "1.0"
          "truncation", null
          "padding", null
          "added_tokens", JsonArray(added |> List.map addedNode |> Array.ofList)
          "normalizer",
          obj [ "type", jstr "BertNormalizer"; "clean_text", jbool true; "handle_chinese_chars", jbool basic.ChineseChars
                "strip_accents", (match basic.StripAccents with Some b -> jbool b | None -> null); "lowercase", jbool basic.LowerCase ]
          "pre_tokenizer", obj [ "type", jstr "BertPreTokenizer" ]
          "post_processor",
          obj [ "type", jstr "TemplateProcessing"
                "single", JsonArray(piece cls 0, piece "$A" 0, piece sep 0)
                "pair", JsonArray(piece cls 0, piece "$A" 0, piece sep 0, piece "$B" 1, piece sep 1)
                "special_tokens", obj [ cls, specialNode cls clsId; sep, specialNode sep sepId ] ]
          "decoder", obj [ "type", jstr "WordPiece"; "prefix", jstr "##"; "cleanup", jbool true ]
          "model",
          obj [ "type", jstr "WordPiece"; "unk_token", jstr unk; "continuing_subword_prefix", jstr "##"
                "max_input_chars_per_word", jint 100; "vocab", obj [ for t, id in vocab -> t, jint id ] ] ]

/// Whether the folder's tokenizer is BERT's (tokenizer_class BertTokenizer[Fast], else model_type bert).
let private isBert (s: Settings) =
    match s.TokenizerClass with
    | Some c -> c = "BertTokenizer" || c = "BertTokenizerFast"
    | None -> s.ModelType = Some "bert"

/// The tokenizer of an encoder folder: its tokenizer.json if present; else BERT's `vocab.txt` through
/// `wordPieceDocument`; else the slow files `HfTokenizer.fromFolder` reads (RoBERTa's vocab.json + merges.txt).
/// A BERT tokenizer gets BertTokenizer's default special tokens for roles its files leave unnamed
/// (bert-base-uncased's tokenizer_config.json names none).
let fromFolder (dir: string) : HfTokenizer =
    let vocabTxt = Path.Combine(dir, "vocab.txt")
    if File.Exists(Path.Combine(dir, "tokenizer.json")) || not (File.Exists vocabTxt) then
        let tokenizer = HfTokenizer.fromFolder dir
        if isBert tokenizer.Settings then
            use _ = tokenizer
            new HfTokenizer(tokenizer.Source, tokenizer.Document, withBertDefaults tokenizer.Settings)
        else tokenizer
    else
        let settings = withBertDefaults (readSettings dir)
        new HfTokenizer(vocabTxt, wordPieceDocument vocabTxt settings (readBasicSettings dir), settings)

/// BERT's token type ids of a pair encoded `[CLS] A [SEP] B [SEP]`: 0 through the first `sepId`, 1 after it
/// (all 0 when there is no separator, a single text).
let pairTokenTypes (sepId: int) (ids: int[]) : int64[] =
    match Array.tryFindIndex ((=) sepId) ids with
    | Some k -> Array.init ids.Length (fun i -> if i <= k then 0L else 1L)
    | None -> Array.zeroCreate ids.Length
