/// Tokenizers: pretrained subword encoders (cl100k_base, GPT-2 byte-level BPE, SentencePiece) behind one
/// interface, with a model vocabulary trimmed to the ids seen in training plus four special tokens.
///
/// Two id spaces. "Base ids" are the pretrained encoder's (cl100k_base has ~100k); "model ids" index the
/// embedding table: 0 pad, 1 bos, 2 eos, 3 unk, then the kept base ids in ascending order. Trimming keeps
/// the embedding table as small as the training data allows; the mapping is a `Vocabulary`, saved as JSON
/// beside a checkpoint so the checkpoint decodes on its own.
module Moe.Tokenizers

open System
open System.IO
open System.Security.Cryptography
open System.Text
open System.Text.Json
open System.Text.RegularExpressions
open Microsoft.ML.Tokenizers

/// Model ids of the special tokens.
type SpecialIds =
    { Pad: int
      Bos: int
      Eos: int
      Unk: int }

/// What a model sees: text to model ids and back.
type ITokenizer =
    /// e.g. `cl100k_base (trimmed to 3120 ids)`.
    abstract Name: string
    /// Rows of the embedding table: specials plus kept base ids.
    abstract VocabSize: int
    abstract Specials: SpecialIds
    /// Model ids of `text`, with no bos/eos added (the batcher adds them).
    abstract Encode: text: string -> int[]
    /// Text of model ids: pad, bos and eos are dropped, unk is written `<unk>`.
    abstract Decode: ids: int[] -> string

/// Which pretrained encoder gives the base ids; enough to rebuild it.
type BaseKind =
    /// OpenAI's cl100k_base through `TiktokenTokenizer.CreateForEncoding`, data embedded in a NuGet package.
    | Cl100kBase
    /// GPT-2 byte-level BPE (Radford et al. 2019) from `encoder.json` and `vocab.bpe`.
    | Gpt2Bpe of encoderJson: string * vocabBpe: string
    /// A SentencePiece `.model` protobuf (Kudo & Richardson 2018), BPE or unigram.
    | SentencePieceModel of modelFile: string

/// A pretrained encoder in base ids.
type IBaseEncoder =
    abstract Kind: BaseKind
    /// Base ids lie in 0 .. Size - 1.
    abstract Size: int
    /// Identifies the exact vocabulary (file hashes), so a saved mapping is never applied to another.
    abstract Fingerprint: string
    abstract Encode: text: string -> int[]
    abstract Decode: ids: int[] -> string

/// The number of special tokens ahead of the kept base ids.
[<Literal>]
let SpecialCount = 4

/// pad 0, bos 1, eos 2, unk 3.
let specials : SpecialIds = { Pad = 0; Bos = 1; Eos = 2; Unk = 3 }

/// How an unknown token is written by `Decode`.
[<Literal>]
let UnkText = "<unk>"

/// GPT-2's pre-tokenizer (openai/gpt-2 `encoder.py`): contractions, letters, digits, other symbols,
/// each optionally with one leading space, then runs of whitespace.
let gpt2Pattern = @"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

let private sha256OfFiles (files: string list) =
    use sha = SHA256.Create()
    for f in files do
        let bytes = File.ReadAllBytes f
        sha.TransformBlock(bytes, 0, bytes.Length, null, 0) |> ignore
    sha.TransformFinalBlock([||], 0, 0) |> ignore
    Convert.ToHexString(sha.Hash).ToLowerInvariant()

let private requireFile (what: string) (path: string) =
    if String.IsNullOrWhiteSpace path then invalidArg what (sprintf "expected a path to the %s, got an empty string" what)
    if not (File.Exists path) then
        raise (FileNotFoundException(sprintf "%s not found: %s" what (Path.GetFullPath path), path))
    if FileInfo(path).Length = 0L then invalidArg what (sprintf "expected a non-empty %s, got an empty file: %s" what path)

let private wrap (kind: BaseKind) (size: int) (fingerprint: string) (tok: Tokenizer) : IBaseEncoder =
    { new IBaseEncoder with
        member _.Kind = kind
        member _.Size = size
        member _.Fingerprint = fingerprint
        member _.Encode text = tok.EncodeToIds(text) |> Seq.toArray
        member _.Decode ids = tok.Decode(ids) }

/// cl100k_base (GPT-4's encoding). Its specials (`<|endoftext|>` ...) count as ordinary base ids.
let cl100k () : IBaseEncoder =
    let tok = TiktokenTokenizer.CreateForEncoding "cl100k_base"
    // Ranks run to 100255; the specials sit above with gaps, so the id range ends at the largest special.
    let ranks = 100256
    let size = (tok.SpecialTokens.Values |> Seq.fold max (ranks - 1)) + 1
    wrap Cl100kBase size (sprintf "cl100k_base/%d" size) tok

/// GPT-2 byte-level BPE from `encoder.json` (token -> id) and `vocab.bpe` (merges in priority order).
let gpt2 (encoderJson: string) (vocabBpe: string) : IBaseEncoder =
    requireFile "GPT-2 encoder.json" encoderJson
    requireFile "GPT-2 vocab.bpe" vocabBpe
    let options = BpeOptions(encoderJson, vocabBpe)
    options.ByteLevel <- true
    options.PreTokenizer <- RegexPreTokenizer(Regex(gpt2Pattern, RegexOptions.Compiled), null)
    let tok =
        try BpeTokenizer.Create options
        with e -> invalidArg "encoderJson" (sprintf "expected GPT-2 encoder.json + vocab.bpe, could not read %s and %s: %s" encoderJson vocabBpe e.Message)
    let size = (tok.Vocabulary.Values |> Seq.max) + 1
    wrap (Gpt2Bpe(encoderJson, vocabBpe)) size ("gpt2-bpe/" + sha256OfFiles [ encoderJson; vocabBpe ]) tok

/// A SentencePiece model (`.model`, the ModelProto protobuf of google/sentencepiece), BPE or unigram.
/// The model's own bos/eos are not added; the batcher adds the model-side specials.
let sentencePiece (modelFile: string) : IBaseEncoder =
    requireFile "SentencePiece model" modelFile
    let tok =
        try
            use stream = File.OpenRead modelFile
            SentencePieceTokenizer.Create(stream, false, false, null)
        with e ->
            invalidArg "modelFile"
                (sprintf "expected a SentencePiece model (ModelProto protobuf, BPE or unigram), could not read %s: %s: %s"
                    modelFile (e.GetType().Name) e.Message)
    if tok.Vocabulary.Count = 0 then
        invalidArg "modelFile" (sprintf "expected a SentencePiece model with pieces, got none in %s" modelFile)
    let size = (tok.Vocabulary.Values |> Seq.max) + 1
    wrap (SentencePieceModel modelFile) size ("sentencepiece/" + sha256OfFiles [ modelFile ]) tok

/// Opens the encoder a `BaseKind` names.
let openBase (kind: BaseKind) : IBaseEncoder =
    match kind with
    | Cl100kBase -> cl100k ()
    | Gpt2Bpe(e, v) -> gpt2 e v
    | SentencePieceModel m -> sentencePiece m

/// `cl100k_base`, `gpt2`, `sentencepiece`.
let kindName (kind: BaseKind) : string =
    match kind with
    | Cl100kBase -> "cl100k_base"
    | Gpt2Bpe _ -> "gpt2"
    | SentencePieceModel _ -> "sentencepiece"

// ---------------------------------------------------------------- vocabulary

/// Base ids <-> model ids. Model id of `Kept[i]` is `SpecialCount + i`.
type Vocabulary =
    { Base: BaseKind
      BaseFingerprint: string
      BaseSize: int
      /// Kept base ids, strictly ascending; every base id when not trimmed.
      Kept: int[]
      /// True when `Kept` is every base id (then the JSON does not list them).
      Full: bool }

/// Tokenizer settings.
type TokenizerConfig =
    { Base: BaseKind
      /// Keep only base ids seen in the training texts (plus the specials).
      Trim: bool
      /// A base id is kept when seen at least this often; rarer ones become unk, which also gives the
      /// model unk examples to learn from (1 keeps everything seen).
      MinCount: int }

module TokenizerConfig =
    /// cl100k_base, trimmed to ids seen at least once.
    let defaults = { Base = Cl100kBase; Trim = true; MinCount = 1 }

    let validate (cfg: TokenizerConfig) : string list =
        [ if cfg.MinCount < 1 then sprintf "MinCount must be >= 1, got %d" cfg.MinCount
          match cfg.Base with
          | Cl100kBase -> ()
          | Gpt2Bpe(e, v) ->
              if not (File.Exists e) then sprintf "GPT-2 encoder.json not found: %s" e
              if not (File.Exists v) then sprintf "GPT-2 vocab.bpe not found: %s" v
          | SentencePieceModel m -> if not (File.Exists m) then sprintf "SentencePiece model not found: %s" m ]

module Vocabulary =
    /// Every base id.
    let full (encoder: IBaseEncoder) : Vocabulary =
        { Base = encoder.Kind; BaseFingerprint = encoder.Fingerprint; BaseSize = encoder.Size
          Kept = Array.init encoder.Size id; Full = true }

    /// Base ids whose count is at least `minCount`; `counts` is indexed by base id.
    let trimmed (encoder: IBaseEncoder) (minCount: int) (counts: int64[]) : Vocabulary =
        if counts.Length <> encoder.Size then
            invalidArg "counts" (sprintf "expected counts for %d base ids, got %d" encoder.Size counts.Length)
        if minCount < 1 then invalidArg "minCount" (sprintf "expected minCount >= 1, got %d" minCount)
        let kept = [| for i in 0 .. counts.Length - 1 do if counts[i] >= int64 minCount then i |]
        { Base = encoder.Kind; BaseFingerprint = encoder.Fingerprint; BaseSize = encoder.Size; Kept = kept; Full = false }

    /// Model vocabulary size: specials plus kept ids.
    let size (v: Vocabulary) : int = SpecialCount + v.Kept.Length

    let private formatTag = "moe-vocabulary"
    let private formatVersion = 1

    /// Writes the mapping as JSON (atomically: a temporary file, then a rename).
    let save (path: string) (v: Vocabulary) : unit =
        let tmp = path + ".tmp"
        do
            use stream = File.Create tmp
            use w = new Utf8JsonWriter(stream, JsonWriterOptions(Indented = true))
            w.WriteStartObject()
            w.WriteString("format", formatTag)
            w.WriteNumber("version", formatVersion)
            w.WriteStartObject("base")
            w.WriteString("kind", kindName v.Base)
            match v.Base with
            | Cl100kBase -> ()
            | Gpt2Bpe(e, b) ->
                w.WriteString("encoder_json", Path.GetFullPath e)
                w.WriteString("vocab_bpe", Path.GetFullPath b)
            | SentencePieceModel m -> w.WriteString("model", Path.GetFullPath m)
            w.WriteString("fingerprint", v.BaseFingerprint)
            w.WriteNumber("size", v.BaseSize)
            w.WriteEndObject()
            w.WriteStartObject("specials")
            w.WriteNumber("pad", specials.Pad)
            w.WriteNumber("bos", specials.Bos)
            w.WriteNumber("eos", specials.Eos)
            w.WriteNumber("unk", specials.Unk)
            w.WriteEndObject()
            if v.Full then w.WriteNull("kept")
            else
                w.WriteStartArray("kept")
                for k in v.Kept do w.WriteNumberValue k
                w.WriteEndArray()
            w.WriteEndObject()
        File.Move(tmp, path, true)

    /// Reads a mapping written by `save`; every missing or inconsistent field is an error naming the file.
    let load (path: string) : Vocabulary =
        if not (File.Exists path) then raise (FileNotFoundException(sprintf "vocabulary file not found: %s" path, path))
        let fail msg = raise (InvalidDataException(sprintf "%s: %s" path msg))
        use doc =
            try JsonDocument.Parse(File.ReadAllBytes path)
            with :? JsonException as e -> fail (sprintf "expected a vocabulary JSON object, got malformed JSON (%s)" e.Message)
        let root = doc.RootElement
        let prop (el: JsonElement) (name: string) =
            match el.TryGetProperty name with
            | true, p -> p
            | _ -> fail (sprintf "expected a \"%s\" field" name)
        let str el name =
            let p = prop el name
            if p.ValueKind <> JsonValueKind.String then fail (sprintf "expected \"%s\" to be a string" name)
            p.GetString()
        let int el name =
            let p = prop el name
            if p.ValueKind <> JsonValueKind.Number then fail (sprintf "expected \"%s\" to be a number" name)
            p.GetInt32()
        if root.ValueKind <> JsonValueKind.Object then fail "expected a JSON object"
        if str root "format" <> formatTag then fail (sprintf "expected format \"%s\"" formatTag)
        let version = int root "version"
        if version <> formatVersion then fail (sprintf "expected version %d, got %d" formatVersion version)
        let b = prop root "base"
        let kind =
            match str b "kind" with
            | "cl100k_base" -> Cl100kBase
            | "gpt2" -> Gpt2Bpe(str b "encoder_json", str b "vocab_bpe")
            | "sentencepiece" -> SentencePieceModel(str b "model")
            | other -> fail (sprintf "expected base kind cl100k_base|gpt2|sentencepiece, got \"%s\"" other)
        let sp = prop root "specials"
        let saved = { Pad = int sp "pad"; Bos = int sp "bos"; Eos = int sp "eos"; Unk = int sp "unk" }
        if saved <> specials then fail (sprintf "expected specials %A, got %A" specials saved)
        let size = int b "size"
        let keptEl = prop root "kept"
        let full, kept =
            match keptEl.ValueKind with
            | JsonValueKind.Null -> true, Array.init size id
            | JsonValueKind.Array -> false, [| for e in keptEl.EnumerateArray() -> e.GetInt32() |]
            | _ -> fail "expected \"kept\" to be an array of base ids or null"
        for i in 1 .. kept.Length - 1 do
            if kept[i] <= kept[i - 1] then fail (sprintf "expected \"kept\" strictly ascending, got %d after %d" kept[i] kept[i - 1])
        if kept.Length > 0 && (kept[0] < 0 || kept[kept.Length - 1] >= size) then
            fail (sprintf "expected kept base ids in 0..%d" (size - 1))
        { Base = kind; BaseFingerprint = str b "fingerprint"; BaseSize = size; Kept = kept; Full = full }

/// Counts how often each base id occurs in `texts`, indexed by base id.
let countIds (encoder: IBaseEncoder) (texts: seq<string>) : int64[] =
    let counts = Array.zeroCreate<int64> encoder.Size
    for t in texts do
        for id in encoder.Encode t do counts[id] <- counts[id] + 1L
    counts

/// A base encoder with a model vocabulary: the `ITokenizer` models use.
type Tokenizer(encoder: IBaseEncoder, vocabulary: Vocabulary) =
    do
        if encoder.Fingerprint <> vocabulary.BaseFingerprint then
            invalidArg "vocabulary"
                (sprintf "expected a vocabulary for %s, got one saved for %s (the tokenizer files changed since it was saved)"
                    encoder.Fingerprint vocabulary.BaseFingerprint)
    // base id -> model id; unk for ids the vocabulary dropped.
    let toModel =
        let m = Array.create encoder.Size specials.Unk
        vocabulary.Kept |> Array.iteri (fun i b -> m[b] <- SpecialCount + i)
        m
    let size = Vocabulary.size vocabulary
    let name =
        if vocabulary.Full then kindName encoder.Kind
        else sprintf "%s (trimmed to %d ids)" (kindName encoder.Kind) vocabulary.Kept.Length

    member _.Encoder = encoder
    member _.Vocabulary = vocabulary

    /// Model ids of base ids (unk where the vocabulary dropped the id).
    member _.ToModelIds(baseIds: int[]) : int[] =
        baseIds |> Array.map (fun b ->
            if b < 0 || b >= toModel.Length then
                invalidArg "baseIds" (sprintf "expected base ids in 0..%d, got %d" (toModel.Length - 1) b)
            toModel[b])

    /// Text of model ids; see `ITokenizer.Decode`.
    member this.Decode(ids: int[]) : string =
        let out = StringBuilder()
        let run = ResizeArray<int>()
        let flush () =
            if run.Count > 0 then
                out.Append(encoder.Decode(run.ToArray())) |> ignore
                run.Clear()
        for id in ids do
            if id < 0 || id >= size then invalidArg "ids" (sprintf "expected model ids in 0..%d, got %d" (size - 1) id)
            elif id = specials.Unk then
                flush ()
                out.Append UnkText |> ignore
            elif id >= SpecialCount then run.Add vocabulary.Kept[id - SpecialCount]
        flush ()
        out.ToString()

    /// Model ids of `text`.
    member this.Encode(text: string) : int[] = this.ToModelIds(encoder.Encode text)

    interface ITokenizer with
        member _.Name = name
        member _.VocabSize = size
        member _.Specials = specials
        member this.Encode text = this.Encode text
        member this.Decode ids = this.Decode ids

/// The tokenizer `cfg` describes, its vocabulary trimmed to `trainingTexts` when `cfg.Trim`.
let train (cfg: TokenizerConfig) (trainingTexts: seq<string>) : Tokenizer =
    match TokenizerConfig.validate cfg with
    | [] -> ()
    | problems -> invalidArg "cfg" ("invalid tokenizer config: " + String.Join("; ", problems))
    let encoder = openBase cfg.Base
    let vocab =
        if cfg.Trim then Vocabulary.trimmed encoder cfg.MinCount (countIds encoder trainingTexts)
        else Vocabulary.full encoder
    Tokenizer(encoder, vocab)

/// Reopens the tokenizer a saved vocabulary names; fails if its base files changed.
let load (vocabularyFile: string) : Tokenizer =
    let v = Vocabulary.load vocabularyFile
    Tokenizer(openBase v.Base, v)

/// Saves the tokenizer's vocabulary mapping (see `Vocabulary.save`).
let save (path: string) (tokenizer: Tokenizer) : unit = Vocabulary.save path tokenizer.Vocabulary
