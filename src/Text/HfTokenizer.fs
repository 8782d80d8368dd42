/// Tokenizers of Hugging Face checkpoint folders, with `transformers`' ids, special tokens and decoded text.
///
/// Every folder goes through one implementation, the Hugging Face `tokenizers` library (Rust, through the
/// Tokenizers.DotNet package), the one `transformers`' fast tokenizers run:
/// - `tokenizer.json` is loaded as it is;
/// - `vocab.json` + `merges.txt` (byte-level BPE: BART, RoBERTa, GPT-2, Qwen2) and `spiece.model`
///   (SentencePiece unigram: T5 with its extra ids, Pegasus with its offset of special tokens) are first turned
///   into the `tokenizer.json` that `transformers`' converters (convert_slow_tokenizer.py, v4.45.1: GPT2Converter,
///   RobertaConverter, Qwen2Converter, T5Converter, PegasusConverter) would write, which is what `AutoTokenizer`
///   itself runs for such a folder.
/// Special tokens and settings come from `tokenizer_config.json`, `special_tokens_map.json`, `added_tokens.json`
/// and `config.json`.
///
/// The package's `Encode` always applies the post-processor (the special tokens) and its `Decode` always skips
/// special tokens, so each folder loads three native tokenizers from the same JSON: as written, without the
/// post-processor (encoding without special tokens), and with every added token marked non-special (decoding
/// that keeps them).
///
/// Axes: `B` batch, `L` padded length.
module Moe.HfTokenizer

open System
open System.Collections.Generic
open System.IO
open System.Runtime.InteropServices
open System.Text
open System.Text.Json
open System.Text.Json.Nodes
open TorchSharp


// ---------------------------------------------------------------------------------------------------------
// Native library

/// The native library's file in the runtime package beside the managed package, where Tokenizers.DotNet.dll was
/// loaded from the NuGet package folder (`dotnet fsi`: `<packages>/tokenizers.dotnet/<v>/lib/<tfm>/`); None in
/// a built app, whose deps.json names the native file.
let private packagedNativeLibrary () : string option =
    let location = typeof<Tokenizers.DotNet.Tokenizer>.Assembly.Location
    if String.IsNullOrEmpty location || not (OperatingSystem.IsLinux()) then None
    else
        let versionDir = DirectoryInfo(Path.GetDirectoryName location).Parent.Parent
        let packages = versionDir.Parent.Parent.FullName
        let file =
            Path.Combine(packages, "tokenizers.dotnet.runtime.linux-x64", versionDir.Name, "runtimes", "linux-x64", "native", "libhf_tokenizers.so")
        if File.Exists file then Some file else None

/// fsi resolves native names only for the packages of the script being run, not for those of a script it
/// `#load`s (scripts/prelude.fsx), so the package's `hf_tokenizers` is resolved here by absolute path.
let private nativeReady =
    lazy
        (match packagedNativeLibrary () with
         | None -> ()
         | Some file ->
             let handle = NativeLibrary.Load file
             let resolver = DllImportResolver(fun name _ _ -> if name = "hf_tokenizers" then handle else IntPtr.Zero)
             // A resolver set by an earlier evaluation of this file (fsi) keeps working.
             try NativeLibrary.SetDllImportResolver(typeof<Tokenizers.DotNet.Tokenizer>.Assembly, resolver)
             with :? InvalidOperationException -> ())

/// A native tokenizer from a tokenizer.json document, through a temporary file (the package loads from a path).
let private nativeOf (source: string) (doc: JsonObject) : Tokenizers.DotNet.Tokenizer =
    nativeReady.Force()
    let tmp = Path.Combine(Path.GetTempPath(), sprintf "moe-tokenizer-%d-%s.json" Environment.ProcessId (Guid.NewGuid().ToString "N"))
    try
        File.WriteAllText(tmp, doc.ToJsonString())
        try new Tokenizers.DotNet.Tokenizer(tmp)
        with :? Tokenizers.DotNet.TokenizerException as e ->
            failwithf "%s: the Hugging Face tokenizers library could not load it: %s" source e.Message
    finally
        File.Delete tmp

// ---------------------------------------------------------------------------------------------------------
// SentencePiece model files

/// One piece of a SentencePiece model: text, score, and type (1 normal, 2 unknown, 3 control, 4 user-defined,
/// 5 unused, 6 byte).
type SentencePiece = { Piece: string; Score: float32; Type: int }

/// The parts of a SentencePiece `ModelProto` that a tokenizer.json needs.
type SentencePieceModel =
    { Pieces: SentencePiece[]
      /// TrainerSpec.model_type: 1 unigram, 2 BPE, 3 word, 4 char.
      ModelType: int
      UnkId: int
      ByteFallback: bool
      PrecompiledCharsmap: byte[] }

/// A protobuf reader over the fields it is asked for (wire types 0, 1, 2, 5).
type private Proto(file: string, bytes: byte[], start: int, stop: int) =
    let mutable pos = start
    let fail (what: string) = failwithf "%s: not a SentencePiece model (ModelProto protobuf): %s at byte %d" file what pos
    member _.AtEnd = pos >= stop
    member _.Varint() : uint64 =
        let mutable result = 0UL
        let mutable shift = 0
        let mutable fin = false
        while not fin do
            if pos >= stop || shift > 63 then fail "truncated varint"
            let b = bytes.[pos]
            pos <- pos + 1
            result <- result ||| (uint64 (b &&& 0x7Fuy) <<< shift)
            shift <- shift + 7
            fin <- b &&& 0x80uy = 0uy
        result
    /// The next field: number, wire type, and for wire type 2 its (start, stop) range.
    member this.Next() : int * int * int * int =
        let key = this.Varint()
        let field = int (key >>> 3)
        let wire = int (key &&& 7UL)
        match wire with
        | 0 -> field, wire, int (this.Varint()), 0
        | 1 ->
            if pos + 8 > stop then fail "truncated fixed64"
            pos <- pos + 8
            field, wire, pos - 8, pos
        | 2 ->
            let len = int (this.Varint())
            if len < 0 || pos + len > stop then fail "truncated length-delimited field"
            pos <- pos + len
            field, wire, pos - len, pos
        | 5 ->
            if pos + 4 > stop then fail "truncated fixed32"
            pos <- pos + 4
            field, wire, pos - 4, pos
        | w -> fail (sprintf "unknown wire type %d" w)

/// Reads a SentencePiece `.model` file (google/sentencepiece's sentencepiece_model.proto): pieces (field 1),
/// TrainerSpec (2: model_type 3, byte_fallback 35, unk_id 40) and NormalizerSpec (3: precompiled_charsmap 2),
/// with the proto's defaults for fields left out.
let readSentencePieceModel (file: string) : SentencePieceModel =
    let bytes = File.ReadAllBytes file
    let pieces = ResizeArray<SentencePiece>()
    let mutable modelType = 1
    let mutable unkId = 0
    let mutable byteFallback = false
    let mutable charsmap = Array.empty<byte>
    let top = Proto(file, bytes, 0, bytes.Length)
    while not top.AtEnd do
        match top.Next() with
        | 1, 2, a, b ->
            let p = Proto(file, bytes, a, b)
            let mutable piece = ""
            let mutable score = 0.0f
            let mutable typ = 1
            while not p.AtEnd do
                match p.Next() with
                | 1, 2, s, e -> piece <- Encoding.UTF8.GetString(bytes, s, e - s)
                | 2, 5, s, _ -> score <- BitConverter.ToSingle(bytes, s)
                | 3, 0, v, _ -> typ <- v
                | _ -> ()
            pieces.Add { Piece = piece; Score = score; Type = typ }
        | 2, 2, a, b ->
            let p = Proto(file, bytes, a, b)
            while not p.AtEnd do
                match p.Next() with
                | 3, 0, v, _ -> modelType <- v
                | 35, 0, v, _ -> byteFallback <- v <> 0
                | 40, 0, v, _ -> unkId <- v
                | _ -> ()
        | 3, 2, a, b ->
            let p = Proto(file, bytes, a, b)
            while not p.AtEnd do
                match p.Next() with
                | 2, 2, s, e -> charsmap <- bytes.[s .. e - 1]
                | _ -> ()
        | _ -> ()
    if pieces.Count = 0 then failwithf "%s: not a SentencePiece model: no pieces (ModelProto field 1)" file
    { Pieces = pieces.ToArray(); ModelType = modelType; UnkId = unkId; ByteFallback = byteFallback; PrecompiledCharsmap = charsmap }

// ---------------------------------------------------------------------------------------------------------
// Settings: tokenizer_config.json, special_tokens_map.json, added_tokens.json, config.json

/// An added token as tokenizer.json's `added_tokens` lists it.
type AddedToken =
    { Id: int
      Content: string
      SingleWord: bool
      LStrip: bool
      RStrip: bool
      Normalized: bool
      Special: bool }

/// The folder's tokenizer settings, as `transformers` reads them (special_tokens_map.json over
/// tokenizer_config.json over the tokenizer class's defaults).
type Settings =
    { /// tokenizer_config.json's `tokenizer_class`, else None.
      TokenizerClass: string option
      /// config.json's `model_type`, else None.
      ModelType: string option
      /// Special tokens by role (`bos_token`, `eos_token`, `unk_token`, `sep_token`, `pad_token`, `cls_token`,
      /// `mask_token`), each with its content.
      Specials: Map<string, string>
      /// Roles the settings set to null (Qwen2's `bos_token`): no token, and no fallback to config.json.
      NullRoles: Set<string>
      AdditionalSpecial: string list
      /// tokenizer_config.json's `added_tokens_decoder`.
      AddedTokensDecoder: AddedToken list
      /// added_tokens.json: token -> id.
      AddedTokensFile: (string * int) list
      AddPrefixSpace: bool option
      AddBosToken: bool option
      /// T5Tokenizer's `legacy`: false makes the SentencePiece conversion prepend "▁" to the first word only.
      Legacy: bool option
      ModelMaxLength: int option
      CleanUpTokenizationSpaces: bool
      /// T5: the number of `<extra_id_N>` tokens (tokenizer_config's `extra_ids`, 100 by default).
      ExtraIds: int option
      /// Pegasus: the number of special tokens before the SentencePiece pieces (`offset`, 103 by default).
      Offset: int option
      /// config.json's `bos_token_id`, `eos_token_id`, `pad_token_id` where the tokenizer names no token.
      ConfigIds: Map<string, int> }

let private specialRoles = [ "bos_token"; "eos_token"; "unk_token"; "sep_token"; "pad_token"; "cls_token"; "mask_token" ]

/// The tokenizer class's family, from `tokenizer_class`, else config.json's `model_type`.
type private Family =
    | Gpt2
    | Roberta
    | Qwen2
    | T5
    | Pegasus
    | Other of string

let private familyOf (s: Settings) : Family =
    let cls = s.TokenizerClass |> Option.map (fun c -> c.Replace("Fast", "")) |> Option.defaultValue ""
    match cls, defaultArg s.ModelType "" with
    | "GPT2Tokenizer", _ -> Gpt2
    | ("RobertaTokenizer" | "BartTokenizer"), _ -> Roberta
    | "Qwen2Tokenizer", _ -> Qwen2
    | "T5Tokenizer", _ -> T5
    | "PegasusTokenizer", _ -> Pegasus
    | "", "gpt2" -> Gpt2
    | "", ("bart" | "roberta") -> Roberta
    | "", ("qwen2" | "qwen2_moe") -> Qwen2
    | "", ("t5" | "mt5" | "switch_transformers") -> T5
    | "", "pegasus" -> Pegasus
    | "", m -> Other(if m = "" then "(no tokenizer_class, no model_type)" else "model_type " + m)
    | c, _ -> Other c

/// The class's default special tokens (the slow tokenizers' __init__ defaults, transformers v4.45.1).
let private classDefaults (family: Family) : (string * string) list =
    match family with
    | Gpt2 -> [ "bos_token", "<|endoftext|>"; "eos_token", "<|endoftext|>"; "unk_token", "<|endoftext|>" ]
    | Roberta ->
        [ "bos_token", "<s>"; "eos_token", "</s>"; "sep_token", "</s>"; "cls_token", "<s>"; "unk_token", "<unk>"
          "pad_token", "<pad>"; "mask_token", "<mask>" ]
    | Qwen2 -> [ "eos_token", "<|endoftext|>"; "pad_token", "<|endoftext|>" ]
    | T5 -> [ "eos_token", "</s>"; "unk_token", "<unk>"; "pad_token", "<pad>" ]
    | Pegasus -> [ "pad_token", "<pad>"; "eos_token", "</s>"; "unk_token", "<unk>"; "mask_token", "<mask_2>" ]
    | Other _ -> []

let private readJson (file: string) : JsonElement option =
    if File.Exists file then
        try
            use doc = JsonDocument.Parse(File.ReadAllText file)
            Some(doc.RootElement.Clone())
        with :? JsonException as e -> failwithf "%s: not valid JSON: %s" file e.Message
    else None

/// A JSON file mapping tokens to ids (vocab.json, added_tokens.json).
let private readTokenIds (file: string) : (string * int) list =
    match readJson file with
    | Some o when o.ValueKind = JsonValueKind.Object ->
        [ for p in o.EnumerateObject() do
              match p.Value.ValueKind with
              | JsonValueKind.Number -> p.Name, p.Value.GetInt32()
              | _ -> failwithf "%s: \"%s\": expected an integer id, got %s" file p.Name (p.Value.GetRawText()) ]
    | Some o -> failwithf "%s: expected a JSON object token -> id, got %s" file (o.ValueKind.ToString())
    | None -> failwithf "no such file: %s" file

/// A special token's content: a string, or an object with `content` (an AddedToken); None for null.
let private tokenContent (file: string) (name: string) (v: JsonElement) : string option =
    match v.ValueKind with
    | JsonValueKind.String -> Some(v.GetString())
    | JsonValueKind.Null -> None
    | JsonValueKind.Object ->
        match v.TryGetProperty "content" with
        | true, c when c.ValueKind = JsonValueKind.String -> Some(c.GetString())
        | _ -> failwithf "%s: field \"%s\": expected a token string or an object with \"content\", got %s" file name (v.GetRawText())
    | _ -> failwithf "%s: field \"%s\": expected a token string or an object with \"content\", got %s" file name (v.GetRawText())

let private boolField (file: string) (name: string) (o: JsonElement) : bool option =
    match o.TryGetProperty name with
    | true, v when v.ValueKind = JsonValueKind.True -> Some true
    | true, v when v.ValueKind = JsonValueKind.False -> Some false
    | true, v when v.ValueKind = JsonValueKind.Null -> None
    | true, v -> failwithf "%s: field \"%s\": expected true or false, got %s" file name (v.GetRawText())
    | _ -> None

/// An integer field; values beyond int (transformers writes 1e30 for "no limit") read as None.
let private intField (file: string) (name: string) (o: JsonElement) : int option =
    match o.TryGetProperty name with
    | true, v when v.ValueKind = JsonValueKind.Number ->
        let d = v.GetDouble()
        if d >= float Int32.MaxValue then None
        elif d <> Math.Floor d then failwithf "%s: field \"%s\": expected an integer, got %s" file name (v.GetRawText())
        else Some(int d)
    | true, v when v.ValueKind = JsonValueKind.Null -> None
    | true, v -> failwithf "%s: field \"%s\": expected an integer, got %s" file name (v.GetRawText())
    | _ -> None

let private stringField (file: string) (name: string) (o: JsonElement) : string option =
    match o.TryGetProperty name with
    | true, v when v.ValueKind = JsonValueKind.String -> Some(v.GetString())
    | true, v when v.ValueKind = JsonValueKind.Null -> None
    | true, v -> failwithf "%s: field \"%s\": expected a string, got %s" file name (v.GetRawText())
    | _ -> None

/// Reads the folder's settings files (all optional).
let readSettings (dir: string) : Settings =
    let configFile = Path.Combine(dir, "tokenizer_config.json")
    let mapFile = Path.Combine(dir, "special_tokens_map.json")
    let addedFile = Path.Combine(dir, "added_tokens.json")
    let modelConfigFile = Path.Combine(dir, "config.json")
    let config = readJson configFile
    let map = readJson mapFile
    let modelConfig = readJson modelConfigFile
    let roleOf (file: string) (o: JsonElement option) (role: string) =
        o |> Option.bind (fun o ->
            match o.TryGetProperty role with
            | true, v -> Some(tokenContent file role v)
            | _ -> None)
    let tokenClass = config |> Option.bind (stringField configFile "tokenizer_class")
    let modelType = modelConfig |> Option.bind (stringField modelConfigFile "model_type")
    let additional (file: string) (o: JsonElement option) =
        o |> Option.bind (fun o ->
            match o.TryGetProperty "additional_special_tokens" with
            | true, v when v.ValueKind = JsonValueKind.Array ->
                Some [ for x in v.EnumerateArray() do
                           match tokenContent file "additional_special_tokens" x with
                           | Some t -> t
                           | None -> () ]
            | _ -> None)
    let decoder =
        match config with
        | Some c ->
            match c.TryGetProperty "added_tokens_decoder" with
            | true, v when v.ValueKind = JsonValueKind.Object ->
                [ for p in v.EnumerateObject() do
                      let id =
                          match Int32.TryParse p.Name with
                          | true, i -> i
                          | _ -> failwithf "%s: added_tokens_decoder: expected integer ids as keys, got \"%s\"" configFile p.Name
                      let field name dflt = boolField configFile name p.Value |> Option.defaultValue dflt
                      { Id = id
                        Content =
                          tokenContent configFile ("added_tokens_decoder." + p.Name) p.Value
                          |> Option.defaultWith (fun () -> failwithf "%s: added_tokens_decoder.%s: expected a token" configFile p.Name)
                        SingleWord = field "single_word" false
                        LStrip = field "lstrip" false
                        RStrip = field "rstrip" false
                        Normalized = field "normalized" true
                        Special = field "special" false } ]
            | _ -> []
        | None -> []
    let addedFileTokens = if File.Exists addedFile then readTokenIds addedFile else []
    let partial =
        { TokenizerClass = tokenClass
          ModelType = modelType
          Specials = Map.empty
          NullRoles = Set.empty
          AdditionalSpecial = []
          AddedTokensDecoder = decoder
          AddedTokensFile = addedFileTokens
          AddPrefixSpace = config |> Option.bind (boolField configFile "add_prefix_space")
          AddBosToken = config |> Option.bind (boolField configFile "add_bos_token")
          Legacy = config |> Option.bind (boolField configFile "legacy")
          ModelMaxLength = config |> Option.bind (intField configFile "model_max_length")
          CleanUpTokenizationSpaces =
            // transformers v4.45.1 defaults it to False unless the class or the file says otherwise.
            config |> Option.bind (boolField configFile "clean_up_tokenization_spaces") |> Option.defaultValue false
          ExtraIds = config |> Option.bind (intField configFile "extra_ids")
          Offset = config |> Option.bind (intField configFile "offset")
          ConfigIds =
            match modelConfig with
            | Some c ->
                [ for name in [ "bos_token_id"; "eos_token_id"; "pad_token_id" ] do
                      match c.TryGetProperty name with
                      | true, v when v.ValueKind = JsonValueKind.Number -> name, v.GetInt32()
                      | _ -> () ]
                |> Map.ofList
            | None -> Map.empty }
    let defaults = classDefaults (familyOf partial) |> Map.ofList
    let values =
        [ for role in specialRoles ->
              role,
              match roleOf mapFile map role with
              | Some v -> Some v
              | None -> roleOf configFile config role ]
    let specials =
        [ for role, value in values do
              match value with
              | Some(Some v) -> role, v
              | Some None -> ()
              | None ->
                  match defaults.TryFind role with
                  | Some v -> role, v
                  | None -> () ]
        |> Map.ofList
    let nullRoles = set [ for role, value in values do if value = Some None then role ]
    let additionalSpecial =
        match additional mapFile map with
        | Some l -> l
        | None -> additional configFile config |> Option.defaultValue []
    { partial with Specials = specials; NullRoles = nullRoles; AdditionalSpecial = additionalSpecial }

// ---------------------------------------------------------------------------------------------------------
// Building tokenizer.json documents as transformers' converters do

let private addedTokenNode (t: AddedToken) : JsonNode =
    JsonObject(
        [ KeyValuePair("id", JsonValue.Create t.Id :> JsonNode)
          KeyValuePair("content", JsonValue.Create t.Content)
          KeyValuePair("single_word", JsonValue.Create t.SingleWord)
          KeyValuePair("lstrip", JsonValue.Create t.LStrip)
          KeyValuePair("rstrip", JsonValue.Create t.RStrip)
          KeyValuePair("normalized", JsonValue.Create t.Normalized)
          KeyValuePair("special", JsonValue.Create t.Special) ])

let private obj (fields: (string * JsonNode) list) : JsonObject =
    JsonObject(fields |> List.map KeyValuePair)

let private jstr (s: string) : JsonNode = JsonValue.Create s
let private jbool (b: bool) : JsonNode = JsonValue.Create b
let private jint (i: int) : JsonNode = JsonValue.Create i

let private byteLevel (addPrefixSpace: bool) (trimOffsets: bool) (useRegex: bool) : JsonNode =
    obj [ "type", jstr "ByteLevel"; "add_prefix_space", jbool addPrefixSpace; "trim_offsets", jbool trimOffsets; "use_regex", jbool useRegex ]

/// Qwen2's pre-tokenizer pattern (digits one by one; Qwen2Converter).
let private qwen2Pattern =
    @"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

let private template (single: string list) (pair: string list) (specials: (string * int) list) : JsonNode =
    let piece (p: string) : JsonNode =
        match p with
        | "$A" | "$B" -> obj [ "Sequence", obj [ "id", jstr (p.Substring 1); "type_id", jint 0 ] ]
        | t -> obj [ "SpecialToken", obj [ "id", jstr t; "type_id", jint 0 ] ]
    let arr (l: string list) = JsonArray(l |> List.map piece |> Array.ofList)
    let specialsNode =
        obj [ for (t, id) in specials ->
                  t, (obj [ "id", jstr t; "ids", JsonArray(jint id); "tokens", JsonArray(jstr t) ] :> JsonNode) ]
    obj [ "type", jstr "TemplateProcessing"; "single", arr single; "pair", arr pair; "special_tokens", specialsNode ]

let private document (normalizer: JsonNode) (preTokenizer: JsonNode) (postProcessor: JsonNode) (decoder: JsonNode)
                     (model: JsonNode) (added: AddedToken list) : JsonObject =
    obj [ "version", jstr "1.0"
          "truncation", null
          "padding", null
          "added_tokens", JsonArray(added |> List.sortBy _.Id |> List.map addedTokenNode |> Array.ofList)
          "normalizer", normalizer
          "pre_tokenizer", preTokenizer
          "post_processor", postProcessor
          "decoder", decoder
          "model", model ]

/// The added tokens `transformers` registers for a folder: `added_tokens_decoder`, the special tokens (at their
/// vocabulary id, or appended after the last id), and added_tokens.json. `flags` gives a special token's
/// lstrip/normalized as its class declares them.
let private addedTokensFor (s: Settings) (vocabId: string -> int option) (firstFreeId: int)
                           (flags: string -> string -> AddedToken -> AddedToken) : AddedToken list =
    let byContent = Dictionary<string, AddedToken>()
    let mutable nextId = firstFreeId
    let add (t: AddedToken) = if not (byContent.ContainsKey t.Content) then byContent.[t.Content] <- t
    for t in s.AddedTokensDecoder do add t
    let idOf (content: string) =
        match vocabId content with
        | Some id -> id
        | None ->
            match s.AddedTokensFile |> List.tryFind (fun (c, _) -> c = content) with
            | Some(_, id) -> id
            | None ->
                let id = nextId
                nextId <- nextId + 1
                id
    let plain content special =
        { Id = idOf content; Content = content; SingleWord = false; LStrip = false; RStrip = false; Normalized = true; Special = special }
    for KeyValue(role, content) in s.Specials do add (flags role content (plain content true))
    for content in s.AdditionalSpecial do add (flags "additional_special_tokens" content (plain content true))
    for (content, id) in s.AddedTokensFile do
        add { Id = id; Content = content; SingleWord = false; LStrip = false; RStrip = false; Normalized = true; Special = false }
    byContent.Values |> List.ofSeq

/// vocab.json + merges.txt -> the tokenizer.json of GPT2Converter, RobertaConverter or Qwen2Converter.
let bpeDocument (vocabFile: string) (mergesFile: string) (s: Settings) : JsonObject =
    let family = familyOf s
    let vocab = readTokenIds vocabFile
    let merges =
        File.ReadAllLines mergesFile
        |> Array.mapi (fun i line -> i + 1, line)
        |> Array.filter (fun (i, line) -> not (i = 1 && line.StartsWith "#version") && line.Trim() <> "")
        |> Array.map (fun (i, line) ->
            match line.Split([| ' '; '\t' |], StringSplitOptions.RemoveEmptyEntries) with
            | [| a; b |] -> jstr (a + " " + b)
            | _ -> failwithf "%s:%d: expected a merge \"left right\", got \"%s\"" mergesFile i line)
    let vocabMap = Dictionary<string, int>()
    for (t, id) in vocab do vocabMap.[t] <- id
    let vocabId (t: string) = match vocabMap.TryGetValue t with | true, id -> Some id | _ -> None
    let firstFree = if vocabMap.Count = 0 then 0 else (vocabMap.Values |> Seq.max) + 1
    let addPrefixSpace = defaultArg s.AddPrefixSpace false
    let flags (role: string) (_: string) (t: AddedToken) =
        match family, role with
        // BartTokenizer and RobertaTokenizer declare `<mask>` with lstrip=True (RoBERTa's also normalized=False).
        | Roberta, "mask_token" -> { t with LStrip = true; Normalized = (s.TokenizerClass |> Option.exists (fun c -> c.StartsWith "Bart")) }
        | Qwen2, _ -> { t with Normalized = false }
        | _ -> t
    let added = addedTokensFor s vocabId firstFree flags
    let idOfToken (t: string) =
        match vocabId t with
        | Some id -> id
        | None ->
            match added |> List.tryFind (fun a -> a.Content = t) with
            | Some a -> a.Id
            | None -> failwithf "%s: special token %s is not in the vocabulary" vocabFile t
    let special role =
        match s.Specials.TryFind role with
        | Some t -> t
        | None -> failwithf "%s: the tokenizer needs a %s (tokenizer_config.json or special_tokens_map.json)" (Path.GetDirectoryName vocabFile) role
    let model =
        obj [ "type", jstr "BPE"
              "dropout", null
              "unk_token", null
              "continuing_subword_prefix", jstr ""
              "end_of_word_suffix", jstr ""
              "fuse_unk", jbool false
              "byte_fallback", jbool false
              "ignore_merges", jbool false
              "vocab", obj [ for (t, id) in vocab -> t, jint id ]
              "merges", JsonArray(merges) ]
    match family with
    | Gpt2 ->
        let post =
            if defaultArg s.AddBosToken false then
                let bos = special "bos_token"
                template [ bos; "$A" ] [ bos; "$A"; "$B" ] [ bos, idOfToken bos ]
            else byteLevel true false true
        document null (byteLevel addPrefixSpace true true) post (byteLevel true true true) model added
    | Roberta ->
        let sep = special "sep_token"
        let cls = special "cls_token"
        let post =
            obj [ "type", jstr "RobertaProcessing"
                  "sep", JsonArray(jstr sep, jint (idOfToken sep))
                  "cls", JsonArray(jstr cls, jint (idOfToken cls))
                  "trim_offsets", jbool true
                  "add_prefix_space", jbool addPrefixSpace ]
        document null (byteLevel addPrefixSpace true true) post (byteLevel true true true) model added
    | Qwen2 ->
        let pre =
            obj [ "type", jstr "Sequence"
                  "pretokenizers",
                  JsonArray(
                      obj [ "type", jstr "Split"; "pattern", obj [ "Regex", jstr qwen2Pattern ]; "behavior", jstr "Isolated"; "invert", jbool false ],
                      byteLevel addPrefixSpace false false) ]
        document (obj [ "type", jstr "NFC" ]) pre (byteLevel false false false) (byteLevel false false false) model added
    | T5 | Pegasus | Other _ ->
        failwithf "%s: vocab.json + merges.txt is read for the byte-level BPE tokenizers (GPT2Tokenizer, RobertaTokenizer, BartTokenizer, Qwen2Tokenizer); this folder's tokenizer is %s"
            (Path.GetDirectoryName vocabFile) (defaultArg s.TokenizerClass (defaultArg s.ModelType "not named"))

/// spiece.model -> the tokenizer.json of T5Converter or PegasusConverter (SentencePiece unigram models).
let sentencePieceDocument (modelFile: string) (s: Settings) : JsonObject =
    let spm = readSentencePieceModel modelFile
    let family = familyOf s
    if spm.ModelType <> 1 then
        failwithf "%s: a SentencePiece model of type %d; T5 and Pegasus tokenizers are unigram models (type 1)" modelFile spm.ModelType
    let pieces = spm.Pieces |> Array.map (fun p -> p.Piece, float p.Score)
    let vocab, unkId =
        match family with
        | T5 ->
            let extra = defaultArg s.ExtraIds 100
            Array.append pieces [| for i in extra - 1 .. -1 .. 0 -> sprintf "<extra_id_%d>" i, 0.0 |], spm.UnkId
        | Pegasus ->
            let offset = defaultArg s.Offset 103
            let role r dflt = s.Specials.TryFind r |> Option.defaultValue dflt
            let maskSent = "<mask_1>"
            let head =
                [| role "pad_token" "<pad>", 0.0
                   role "eos_token" "</s>", 0.0
                   maskSent, 0.0
                   // `<mask_2>` precedes the pieces when its id is below the offset, as in google/pegasus-*.
                   role "mask_token" "<mask_2>", 0.0 |]
            let unks = [| for i in 2 .. offset - 1 -> sprintf "<unk_%d>" i, -100.0 |]
            Array.concat [ head; unks; pieces.[2..] ], spm.UnkId + offset
        | Gpt2 | Roberta | Qwen2 | Other _ ->
            failwithf "%s: spiece.model is read for T5Tokenizer and PegasusTokenizer; this folder's tokenizer is %s"
                modelFile (defaultArg s.TokenizerClass (defaultArg s.ModelType "not named"))
    let vocabIndex = Dictionary<string, int>()
    vocab |> Array.iteri (fun i (t, _) -> if not (vocabIndex.ContainsKey t) then vocabIndex.[t] <- i)
    let vocabId (t: string) = match vocabIndex.TryGetValue t with | true, id -> Some id | _ -> None
    // SpmConverter: control pieces are special added tokens, user-defined ones are not.
    let spmAdded =
        [ for p in spm.Pieces do
              if (p.Type = 3 || p.Type = 4) && vocabIndex.ContainsKey p.Piece then
                  { Id = vocabIndex.[p.Piece]; Content = p.Piece; SingleWord = false; LStrip = false; RStrip = false
                    Normalized = false; Special = (p.Type = 3) } ]
    let specialsAdded =
        let extras =
            match family with
            | T5 -> [ for i in 0 .. defaultArg s.ExtraIds 100 - 1 -> sprintf "<extra_id_%d>" i ]
            | _ -> [ "<mask_1>" ] @ [ for i in 2 .. defaultArg s.Offset 103 - 1 -> sprintf "<unk_%d>" i ]
        let sWith = { s with AdditionalSpecial = (extras @ s.AdditionalSpecial) |> List.distinct }
        addedTokensFor sWith vocabId vocab.Length (fun _ _ t -> { t with Normalized = false })
    let added =
        let seen = HashSet<string>()
        [ for t in spmAdded @ specialsAdded do
              if seen.Add t.Content then t ]
    let eos = s.Specials.TryFind "eos_token" |> Option.defaultValue "</s>"
    let eosId = vocabId eos |> Option.defaultWith (fun () -> failwithf "%s: the eos token %s is not in the vocabulary" modelFile eos)
    // convert_slow_tokenizer._get_prepend_scheme: add_prefix_space (true by default) prepends "▁" to every word;
    // T5Tokenizer with legacy=false only to the first.
    let prependScheme =
        match family, s.Legacy with
        | T5, Some false -> "first"
        | _ -> if defaultArg s.AddPrefixSpace true then "always" else "never"
    let metaspace = obj [ "type", jstr "Metaspace"; "replacement", jstr "▁"; "prepend_scheme", jstr prependScheme; "split", jbool true ]
    let normalizer =
        let tail =
            [ obj [ "type", jstr "Strip"; "strip_left", jbool false; "strip_right", jbool true ] :> JsonNode
              obj [ "type", jstr "Replace"; "pattern", obj [ "Regex", jstr " {2,}" ]; "content", jstr "▁" ] ]
        let head =
            if spm.PrecompiledCharsmap.Length = 0 then []
            else [ obj [ "type", jstr "Precompiled"; "precompiled_charsmap", jstr (Convert.ToBase64String spm.PrecompiledCharsmap) ] :> JsonNode ]
        obj [ "type", jstr "Sequence"; "normalizers", JsonArray(head @ tail |> Array.ofList) ]
    let pre, post =
        match family with
        | T5 -> metaspace :> JsonNode, template [ "$A"; eos ] [ "$A"; eos; "$B"; eos ] [ eos, eosId ]
        | _ ->
            (obj [ "type", jstr "Sequence"; "pretokenizers", JsonArray(obj [ "type", jstr "WhitespaceSplit" ], metaspace.DeepClone()) ] :> JsonNode),
            template [ "$A"; eos ] [ "$A"; "$B"; eos ] [ eos, eosId ]
    let model =
        obj [ "type", jstr "Unigram"
              "unk_id", jint unkId
              "vocab", JsonArray([| for (t, score) in vocab -> JsonArray(jstr t, JsonValue.Create score) :> JsonNode |])
              "byte_fallback", jbool false ]
    document normalizer pre post (metaspace.DeepClone()) model added

// ---------------------------------------------------------------------------------------------------------
// The tokenizer

/// A batch of encoded texts: ids `[B; L]` int64 padded with the pad id, and the attention mask `[B; L]` bool.
type EncodedBatch = { Ids: torch.Tensor; Mask: torch.Tensor }

/// Which side of a batch padding goes on: right for encoders and encoder-decoders, left for decoder-only
/// generation.
type PaddingSide =
    | PadRight
    | PadLeft

/// One piece of a post-processor's template for a pair of texts.
type private PairPiece =
    | FirstText
    | SecondText
    | SpecialIds of int[]

/// The pair layout of a tokenizer.json's post-processor (TemplateProcessing's `pair`, RobertaProcessing's
/// `cls A sep sep B sep`, BertProcessing's `cls A sep B sep`; none and ByteLevel add nothing).
let rec private pairTemplate (source: string) (post: JsonNode) : PairPiece list =
    let str (n: JsonNode) = n.GetValue<string>()
    let tokenId (n: JsonNode) = SpecialIds [| n.AsArray().[1].GetValue<int>() |]
    match post with
    | null -> [ FirstText; SecondText ]
    | post ->
        let o = post.AsObject()
        match str o.["type"] with
        | "ByteLevel" -> [ FirstText; SecondText ]
        | "RobertaProcessing" -> [ tokenId o.["cls"]; FirstText; tokenId o.["sep"]; tokenId o.["sep"]; SecondText; tokenId o.["sep"] ]
        | "BertProcessing" -> [ tokenId o.["cls"]; FirstText; tokenId o.["sep"]; SecondText; tokenId o.["sep"] ]
        | "TemplateProcessing" ->
            let specials = o.["special_tokens"].AsObject()
            [ for piece in o.["pair"].AsArray() do
                  let p = piece.AsObject()
                  if p.ContainsKey "Sequence" then (if str p.["Sequence"].["id"] = "A" then FirstText else SecondText)
                  else
                      let name = str p.["SpecialToken"].["id"]
                      SpecialIds(specials.[name].["ids"].AsArray() |> Seq.map (fun i -> i.GetValue<int>()) |> Array.ofSeq) ]
        | "Sequence" ->
            let templates =
                [ for p in o.["processors"].AsArray() do
                      let t = pairTemplate source p
                      if t <> [ FirstText; SecondText ] then t ]
            match templates with
            | [] -> [ FirstText; SecondText ]
            | [ t ] -> t
            | _ -> failwithf "%s: more than one post-processor adds special tokens; expected at most one" source
        | other -> failwithf "%s: post-processor %s is not supported for pairs of texts" source other

/// The files a folder's tokenizer is read from, in order of preference.
let lookedFor = "tokenizer.json, vocab.json + merges.txt, spiece.model"

/// A Hugging Face tokenizer: `source` is the file it was read from; `doc` the tokenizer.json it runs.
type HfTokenizer(source: string, doc: JsonObject, settings: Settings) =
    let withSpecial = nativeOf source doc
    let plain =
        let d = doc.DeepClone().AsObject()
        d.["post_processor"] <- null
        nativeOf source d
    let decodeAll =
        let d = doc.DeepClone().AsObject()
        match d.["added_tokens"] with
        | :? JsonArray as arr -> for t in arr do t.AsObject().["special"] <- JsonValue.Create false
        | _ -> ()
        nativeOf source d
    let idToToken = Dictionary<int, string>()
    let tokenToId = Dictionary<string, int>()
    let specialIds = HashSet<int>()
    do
        let addToken (t: string) (id: int) =
            idToToken.[id] <- t
            tokenToId.[t] <- id
        match doc.["model"] with
        | :? JsonObject as model ->
            match model.["vocab"] with
            | :? JsonObject as v -> for KeyValue(t, id) in v do addToken t (id.GetValue<int>())
            | :? JsonArray as v -> v |> Seq.iteri (fun i e -> addToken (e.AsArray().[0].GetValue<string>()) i)
            | _ -> failwithf "%s: expected model.vocab, an object or a list of [piece, score]" source
        | _ -> failwithf "%s: expected a \"model\" object" source
        match doc.["added_tokens"] with
        | :? JsonArray as arr ->
            for t in arr do
                let o = t.AsObject()
                let id = o.["id"].GetValue<int>()
                addToken (o.["content"].GetValue<string>()) id
                if o.["special"].GetValue<bool>() then specialIds.Add id |> ignore
        | _ -> ()
    let roleId (role: string) : int option =
        match settings.Specials.TryFind role with
        | Some t ->
            match tokenToId.TryGetValue t with
            | true, id -> Some id
            | _ -> failwithf "%s: %s %s is not in the tokenizer's vocabulary" source role t
        | None when settings.NullRoles.Contains role -> None
        | None -> settings.ConfigIds.TryFind(role.Replace("_token", "_token_id"))
    let bos = roleId "bos_token"
    let eos = roleId "eos_token"
    let pad = roleId "pad_token"
    let unk = roleId "unk_token"
    let mask = roleId "mask_token"
    let maxId = Seq.max idToToken.Keys
    let pairLayout = pairTemplate source doc.["post_processor"]
    let toIds (ids: uint32[]) = ids |> Array.map int
    let checkIds (ids: int[]) =
        for id in ids do
            if id < 0 then invalidArg "ids" (sprintf "expected token ids >= 0, got %d" id)
        ids |> Array.map uint32

    /// The file the tokenizer was read from (tokenizer.json, vocab.json, or spiece.model).
    member _.Source = source
    /// The tokenizer.json it runs (the folder's, or the one built from its slow files).
    member _.Document = doc
    member _.Settings = settings
    /// Number of distinct tokens, added tokens included (`len(tokenizer)` in transformers).
    member _.VocabSize = tokenToId.Count
    /// The largest id the tokenizer can produce.
    member _.MaxId = maxId
    member _.BosId = bos
    member _.EosId = eos
    member _.PadId = pad
    member _.UnkId = unk
    member _.MaskId = mask
    /// The ids of the special added tokens (those `skipSpecialTokens` drops).
    member _.SpecialIds : Set<int> = Set.ofSeq specialIds
    member _.AddPrefixSpace = settings.AddPrefixSpace
    member _.ModelMaxLength = settings.ModelMaxLength
    member _.CleanUpTokenizationSpaces = settings.CleanUpTokenizationSpaces

    /// `transformers`' `tokenizer(text, add_special_tokens=...)["input_ids"]`.
    member _.Encode(text: string, addSpecialTokens: bool) : int[] =
        (if addSpecialTokens then withSpecial else plain).Encode text |> toIds

    /// The ids with the special tokens, and where the text's own ids sit in them (prefix length).
    member this.EncodeParts(text: string) : int[] * int[] * int[] =
        let full = this.Encode(text, true)
        let inner = this.Encode(text, false)
        let n = inner.Length
        let at =
            seq { 0 .. full.Length - n }
            |> Seq.tryFind (fun k -> Seq.forall (fun j -> full.[k + j] = inner.[j]) (seq { 0 .. n - 1 }))
        match at with
        | Some k -> full.[.. k - 1], inner, full.[k + n ..]
        | None -> failwithf "%s: the post-processor does not keep the text's ids together for %A; cannot truncate it" source text

    /// `transformers`' `tokenizer(first, second)["input_ids"]` for a pair of texts (MNLI premise and
    /// hypothesis): the post-processor's pair layout, and with `maxLength` the fast tokenizers' `longest_first`
    /// truncation of the texts' ends (special tokens kept).
    member _.EncodePair(first: string, second: string, addSpecialTokens: bool, ?maxLength: int) : int[] =
        let a = plain.Encode first |> toIds
        let b = plain.Encode second |> toIds
        let layout = if addSpecialTokens then pairLayout else [ FirstText; SecondText ]
        let specials = layout |> List.sumBy (function SpecialIds ids -> ids.Length | _ -> 0)
        let keepA, keepB =
            match maxLength with
            | Some m when a.Length + b.Length + specials > m ->
                let budget = m - specials
                if budget < 0 then invalidArg "maxLength" (sprintf "maxLength %d is shorter than the %d special tokens of a pair" m specials)
                // The Rust library's LongestFirst (utils/truncation.rs): the shorter text (the first on a tie)
                // is kept whole when the longer fits beside it; otherwise the shorter gets budget / 2 and the
                // longer the rest.
                let firstIsShorter = a.Length <= b.Length
                let n1 = min a.Length b.Length
                let n2 = if n1 > budget then n1 else max n1 (budget - n1)
                let n1, n2 = if n1 + n2 > budget then budget / 2, budget / 2 + budget % 2 else n1, n2
                if firstIsShorter then n1, n2 else n2, n1
            | _ -> a.Length, b.Length
        let keepA, keepB = min keepA a.Length, min keepB b.Length
        [| for piece in layout do
               match piece with
               | FirstText -> yield! a.[.. keepA - 1]
               | SecondText -> yield! b.[.. keepB - 1]
               | SpecialIds ids -> yield! ids |]

    /// Token strings of ids (as `convert_ids_to_tokens`).
    member _.IdToToken(id: int) : string =
        match idToToken.TryGetValue id with
        | true, t -> t
        | _ -> invalidArg "id" (sprintf "%s: id %d is not in the vocabulary (largest id %d)" source id maxId)

    member _.TokenToId(token: string) : int option =
        match tokenToId.TryGetValue token with
        | true, id -> Some id
        | _ -> None

    /// The token strings of `text`'s ids.
    member this.Tokens(text: string, addSpecialTokens: bool) : string[] =
        this.Encode(text, addSpecialTokens) |> Array.map this.IdToToken

    /// `transformers`' `decode(ids, skip_special_tokens=...)`, with `clean_up_tokenization_spaces` as the
    /// tokenizer's configuration says.
    member _.Decode(ids: int[], skipSpecialTokens: bool) : string =
        let text = (if skipSpecialTokens then withSpecial else decodeAll).Decode(checkIds ids)
        if settings.CleanUpTokenizationSpaces then
            text.Replace(" .", ".").Replace(" ?", "?").Replace(" !", "!").Replace(" ,", ",").Replace(" ' ", "'")
                .Replace(" n't", "n't").Replace(" 'm", "'m").Replace(" 's", "'s").Replace(" 've", "'ve").Replace(" 're", "'re")
        else text

    /// Encodes a batch with special tokens, padded to its longest sequence with the pad id: ids `[B; L]` int64
    /// and attention mask `[B; L]` bool. With `truncation`, each text's own ids are cut to fit `maxLength`
    /// (the model's `model_max_length` when None) with its special tokens kept, as `transformers` truncates;
    /// without it, a sequence longer than `maxLength` is an error. `padId` overrides the tokenizer's pad token
    /// (GPT-2 has none; decoder-only models commonly pad with EOS).
    member this.EncodeBatch(texts: string[], maxLength: int option, truncation: bool, ?side: PaddingSide, ?padId: int) : EncodedBatch =
        if texts.Length = 0 then invalidArg "texts" "expected at least one text, got none"
        let padWith =
            match padId, pad with
            | Some p, _ -> p
            | None, Some p -> p
            | None, None -> invalidArg "padId" (sprintf "%s: the tokenizer has no pad token; pass padId (e.g. the EOS id %A)" source eos)
        let limit = match maxLength with Some m -> Some m | None -> if truncation then settings.ModelMaxLength else None
        let rows =
            texts
            |> Array.mapi (fun i text ->
                match limit with
                | Some m when truncation ->
                    let prefix, inner, suffix = this.EncodeParts text
                    let budget = m - prefix.Length - suffix.Length
                    if budget < 0 then
                        invalidArg "maxLength" (sprintf "maxLength %d is shorter than the %d special tokens the tokenizer adds" m (prefix.Length + suffix.Length))
                    Array.concat [ prefix; inner.[.. min inner.Length budget - 1]; suffix ]
                | Some m ->
                    let ids = this.Encode(text, true)
                    if ids.Length > m then
                        invalidArg "texts" (sprintf "text %d has %d tokens, more than maxLength %d; pass truncation=true to cut it" i ids.Length m)
                    ids
                | None -> this.Encode(text, true))
        let b = rows.Length
        let l = rows |> Array.map Array.length |> Array.max
        let ids = Array.create (b * l) (int64 padWith)
        let mask = Array.create (b * l) false
        rows
        |> Array.iteri (fun r row ->
            let start = match defaultArg side PadRight with PadRight -> 0 | PadLeft -> l - row.Length
            row |> Array.iteri (fun j id ->
                ids.[r * l + start + j] <- int64 id
                mask.[r * l + start + j] <- true))
        let shape = [| int64 b; int64 l |]
        { Ids = torch.tensor(ids, ReadOnlySpan<int64> shape)    // [B; L]
          Mask = torch.tensor(mask, ReadOnlySpan<int64> shape) } // [B; L]

    interface IDisposable with
        member _.Dispose() =
            withSpecial.Dispose()
            plain.Dispose()
            decodeAll.Dispose()

/// Applies tokenizer_config.json's `add_prefix_space` to a byte-level tokenizer.json whose pre-tokenizer says
/// otherwise, as GPT2TokenizerFast and RobertaTokenizerFast do when they load.
let private withPrefixSpace (s: Settings) (doc: JsonObject) : JsonObject =
    match s.AddPrefixSpace, doc.["pre_tokenizer"] with
    | Some aps, (:? JsonObject as pre) when (pre.["type"] |> Option.ofObj |> Option.map (fun t -> t.GetValue<string>())) = Some "ByteLevel" ->
        pre.["add_prefix_space"] <- JsonValue.Create aps
        match doc.["post_processor"] with
        | :? JsonObject as post when (post.["type"] |> Option.ofObj |> Option.map (fun t -> t.GetValue<string>())) = Some "RobertaProcessing" ->
            post.["add_prefix_space"] <- JsonValue.Create aps
        | _ -> ()
        doc
    | _ -> doc

let private loadDocument (file: string) : JsonObject =
    try
        match JsonNode.Parse(File.ReadAllText file) with
        | :? JsonObject as o -> o
        | _ -> failwithf "%s: expected a JSON object" file
    with :? JsonException as e -> failwithf "%s: not valid JSON: %s" file e.Message

/// Reads the tokenizer of a Hugging Face checkpoint folder: `tokenizer.json` if present, else `vocab.json` +
/// `merges.txt`, else `spiece.model`, with the folder's settings files.
let fromFolder (dir: string) : HfTokenizer =
    if not (Directory.Exists dir) then failwithf "no such tokenizer folder: %s" dir
    let file name = Path.Combine(dir, name)
    let settings = readSettings dir
    if File.Exists(file "tokenizer.json") then
        let path = file "tokenizer.json"
        new HfTokenizer(path, loadDocument path |> withPrefixSpace settings, settings)
    elif File.Exists(file "vocab.json") && File.Exists(file "merges.txt") then
        let path = file "vocab.json"
        new HfTokenizer(path, bpeDocument path (file "merges.txt") settings, settings)
    elif File.Exists(file "spiece.model") then
        let path = file "spiece.model"
        new HfTokenizer(path, sentencePieceDocument path settings, settings)
    elif File.Exists(file "vocab.json") then
        failwithf "%s has vocab.json but no merges.txt: a byte-level BPE tokenizer needs both (looked for %s)" dir lookedFor
    else failwithf "no tokenizer files in %s: looked for %s" dir lookedFor

/// Reads the folder's tokenizer from its slow files (vocab.json + merges.txt, or spiece.model) even where a
/// tokenizer.json exists, as `transformers` converts them; for checking one against the other.
let fromSlowFiles (dir: string) : HfTokenizer =
    let file name = Path.Combine(dir, name)
    let settings = readSettings dir
    if File.Exists(file "vocab.json") && File.Exists(file "merges.txt") then
        new HfTokenizer(file "vocab.json", bpeDocument (file "vocab.json") (file "merges.txt") settings, settings)
    elif File.Exists(file "spiece.model") then
        new HfTokenizer(file "spiece.model", sentencePieceDocument (file "spiece.model") settings, settings)
    else failwithf "no slow tokenizer files in %s: looked for vocab.json + merges.txt, spiece.model" dir

/// The files of a tokenizer folder besides tokenizer.json that `save` carries over.
let private companionFiles =
    [ "tokenizer_config.json"; "special_tokens_map.json"; "added_tokens.json"; "vocab.json"; "merges.txt"; "spiece.model" ]

/// Writes the tokenizer into `dir` as `transformers` reads it: the tokenizer.json it runs (the folder's, or the
/// one built from its slow files) and the source folder's settings and slow files, so an exported checkpoint
/// folder tokenizes as the one it came from. Files already in `dir` with those names are replaced.
let save (dir: string) (tokenizer: HfTokenizer) : unit =
    let sourceDir = Path.GetDirectoryName(Path.GetFullPath tokenizer.Source)
    Directory.CreateDirectory dir |> ignore
    if Path.GetFullPath dir <> sourceDir then
        for name in companionFiles do
            let from = Path.Combine(sourceDir, name)
            if File.Exists from then File.Copy(from, Path.Combine(dir, name), true)
        File.WriteAllText(Path.Combine(dir, "tokenizer.json"), tokenizer.Document.ToJsonString(JsonSerializerOptions(WriteIndented = true)))

/// Fails when the tokenizer can produce ids the model has no embedding for (`modelVocabSize`, config.json's
/// `vocab_size`): a tokenizer file that does not match the vocabulary size.
let checkAgainst (modelVocabSize: int) (tokenizer: HfTokenizer) : unit =
    if tokenizer.MaxId >= modelVocabSize then
        failwithf "%s: a tokenizer file that does not match the vocabulary size: it produces ids up to %d (%d tokens), but the model's vocab_size is %d"
            tokenizer.Source tokenizer.MaxId tokenizer.VocabSize modelVocabSize
