/* chat_fuzz.c: the input is a conversation: one byte of settings (the template, enum
 * mm_chat_template, in bits 0-2 modulo 5; bit 3 add_generation_prompt, bit 4 think), then JSON
 * text as --messages reads it (a list of messages, or an object with "messages" and "tools").
 * Whatever the bytes, reading fails cleanly or gives a conversation; the tools' JSON written out
 * reads back to the same text; a conversation the template accepts renders into a prompt that
 * holds every user text whole and tokenizes and decodes back to itself. */
#include "fuzz.h"

static Model m;
static Tokenizer tok;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0) return 0;
    if (!tok.n_vocab) fuzz_load_tokenizer(&m, &tok);
    int template = (data[0] & 7) % 5;
    bool add_prompt = data[0] & 8, think = data[0] & 16;
    ChatMessage *msgs = NULL;
    char **tools = NULL;
    int n = 0, n_tools = 0;
    const char *err = chat_parse_messages((const char *)data + 1, size - 1, &msgs, &n, &tools, &n_tools);
    if (!err) {
        FUZZ_ASSERT(n > 0);
        for (int i = 0; i < n_tools; i++) {  /* tojson is a fixed point: read it, write it, same text */
            size_t len = strlen(tools[i]);
            char *list = malloc(len + 3);
            snprintf(list, len + 3, "[%s]", tools[i]);
            char **again = NULL;
            int n_again = 0;
            FUZZ_ASSERT(chat_parse_tools(list, len + 2, &again, &n_again) == NULL && n_again == 1);
            FUZZ_ASSERT(strcmp(again[0], tools[i]) == 0);
            free(again[0]);
            free(again);
            free(list);
        }
    }
    if (!err && template != MM_CHAT_NONE && !chat_check(template, msgs, n, n_tools)) {
        char *prompt = chat_render(template, msgs, n, tools, n_tools, add_prompt, think);
        FUZZ_ASSERT(prompt != NULL);
        for (int i = 0; i < n; i++)
            if (!strcmp(msgs[i].role, "user") && msgs[i].content)
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
    }
    for (int i = 0; i < n; i++) chat_message_free(&msgs[i]);
    for (int i = 0; i < n_tools; i++) free(tools[i]);
    free(msgs);
    free(tools);
    return 0;
}
