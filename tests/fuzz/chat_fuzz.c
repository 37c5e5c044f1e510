/* chat_fuzz.c: the input is a conversation: one byte of settings (the template in bits 0-1,
 * bit 2 add_generation_prompt, bit 3 think), then messages separated by NUL bytes, each a role
 * byte ('s' system, 'a' assistant, anything else user) and its text. The rendered prompt must
 * hold every system and user text whole, and tokenize and decode back to itself. */
#include "fuzz.h"

enum { MAX_MESSAGES = 64 };
static Model m;
static Tokenizer tok;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0) return 0;
    if (!tok.n_vocab) fuzz_load_tokenizer(&m, &tok);
    int template = data[0] & 3;
    bool add_prompt = data[0] & 4, think = data[0] & 8;
    char *text = malloc(size);  /* the messages, each NUL-terminated */
    memcpy(text, data + 1, size - 1);
    text[size - 1] = 0;
    ChatMessage msgs[MAX_MESSAGES];
    int n = 0;
    for (char *p = text; p < text + size && n < MAX_MESSAGES; p += strlen(p) + 1) {
        const char *role = *p == 's' ? "system" : *p == 'a' ? "assistant" : "user";
        msgs[n++] = (ChatMessage){role, *p ? p + 1 : p};
    }
    char *prompt = chat_render(template, msgs, n, add_prompt, think);
    FUZZ_ASSERT(prompt != NULL);
    for (int i = 0; i < n; i++)
        if (strcmp(msgs[i].role, "assistant") != 0 || template != MM_CHAT_MINIMIND3)
            FUZZ_ASSERT(strstr(prompt, msgs[i].content) != NULL);
    size_t len = strlen(prompt);
    int *ids = malloc((len + 1) * sizeof(int));
    size_t n_ids = tokenizer_encode(&tok, (const uint8_t *)prompt, len, ids);
    FUZZ_ASSERT(n_ids != (size_t)-1);
    size_t at = 0;
    for (size_t i = 0; i < n_ids; i++) {
        size_t k;
        const uint8_t *b = tokenizer_decode(&tok, ids[i], &k);
        FUZZ_ASSERT(k <= len - at && memcmp(prompt + at, b, k) == 0);
        at += k;
    }
    FUZZ_ASSERT(at == len);
    free(ids);
    free(prompt);
    free(text);
    return 0;
}
